"""The verdict logic on its own, no engine: what counts as passed, what a NaN does, which kind of quantization an
artifact is (one registry for every reader), and when a verification stops vouching for an artifact."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from workbench.manifest import content_digest
from workbench.quantkind import quant_of
from workbench.release.publish import (STALE_REASON, _mark_stale, _verification, artifact_state, meets_requirement,
                                       serving_command)
from workbench.release.spec import Stage
from workbench.verify.probes import Probing, _compare, verdict
from workbench.verify.run import served_context


def checks(*statuses, metrics=None):
    return [{"name": f"c{i}", "status": s, "metrics": metrics or {}} for i, s in enumerate(statuses)]


@pytest.mark.parametrize("statuses, expected", [
    (("passed", "passed"), "passed"),
    (("passed", "skipped"), "incomplete"),  # turned off by the user: not checked, not a pass
    (("passed", "incomplete"), "incomplete"),
    (("incomplete", "failed", "skipped"), "failed"),
])
def test_only_checks_that_all_passed_make_a_pass(statuses, expected):
    assert verdict(checks(*statuses)) == expected


def test_a_nan_anywhere_in_the_figures_fails_the_check():
    assert verdict(checks("passed", metrics={"runs": [{"delta": 0.01}, {"delta": math.nan}]})) == "failed"
    assert verdict(checks("passed", metrics={"delta": 0.01, "note": "nan"})) == "passed"


class _Reference:
    """The reference's answers, fixed: every engine token is its top-1, with these logprobs."""

    def __init__(self, logprobs):
        self.logprobs, self.eos_ids, self.greedy_ids = logprobs, (), {}

    def score(self, answers):
        return [(len(ids), self.logprobs[:len(ids)]) for _, ids in answers]


@pytest.mark.parametrize("engine_logprobs", [[math.nan, -0.5, -0.5], [-0.5, math.nan, -0.5], [-0.5, -0.5, math.nan]])
def test_a_nan_logprob_fails_the_reference_comparison_wherever_it_is(engine_logprobs):
    probing = Probing(kind="fp8", prompts=("p",), reference=_Reference([-0.5, -0.5, -0.5]))
    check = _compare(probing, lambda prompt: ([1, 2, 3], engine_logprobs, "", 3))
    assert check.status == "failed" and math.isnan(check.metrics["max_logprob_delta"])
    assert verdict([check.as_dict()]) == "failed"


def test_close_logprobs_pass_the_reference_comparison():
    probing = Probing(kind="fp8", prompts=("p",), reference=_Reference([-0.5, -0.5, -0.5]))
    check = _compare(probing, lambda prompt: ([1, 2, 3], [-0.6, -0.4, -0.5], "", 3))
    assert check.status == "passed" and check.metrics["max_logprob_delta"] == pytest.approx(0.1)


def _ct(groups):
    return {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": groups}}


@pytest.mark.parametrize("config, method, kind", [
    ({}, None, "full"),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}}, "fp8", "fp8"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}, "gptq", "int4"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": 128}}, "gptq", "int8"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "bitsandbytes", "int8"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, "bitsandbytes", "int4"),
    # NVFP4A16: 4-bit float weights; W8A16: 8-bit integer weights, no activation quantization
    (_ct({"g": {"weights": {"type": "float", "num_bits": 4, "group_size": 16}}}), "compressed-tensors", "fp4"),
    (_ct({"g": {"weights": {"type": "int", "num_bits": 8, "group_size": 128}}}), "compressed-tensors-wna16", "int8"),
    (_ct({"g": {"weights": {"type": "int", "num_bits": 4, "group_size": 128}}}), "compressed-tensors-wna16", "int4"),
    (_ct({"g": {"weights": {"type": "int", "num_bits": 8}, "input_activations": {"type": "int", "num_bits": 8}}}),
     "compressed-tensors", "int8"),
    (_ct({"g": {"weights": {"type": "float", "num_bits": 8, "block_structure": [128, 128]}}}), "fp8", "fp8"),
])
def test_one_registry_names_every_method_and_scheme(config, method, kind):
    quant = quant_of(config)
    assert (quant.method, quant.kind) == (method, kind)


def test_the_verify_gates_know_every_kind():
    from workbench.quantkind import KIND_BY_WEIGHTS
    from workbench.verify.probes import MAX_LOGPROB_DELTA, MIN_TOKEN_AGREEMENT

    for kind in KIND_BY_WEIGHTS.values():
        assert kind in MIN_TOKEN_AGREEMENT and kind in MAX_LOGPROB_DELTA


# ---------------------------------------------------------------- a verification names its bytes

def _verify_stage(tmp_path, artifact, served_sha256):
    report_dir = tmp_path / "reports" / "verify-fp8-vllm"
    report_dir.mkdir(parents=True)
    report = {"engine": "vllm", "verdict": "passed", "artifact": str(artifact), "artifact_sha256": served_sha256,
              "runs": [{"tp": 1, "checks": [{"name": "reference", "status": "passed", "metrics": {}}]}]}
    (report_dir / "report.json").write_text(json.dumps(report))
    return Stage("verify-fp8-vllm", "verify", ("fp8",), {"engine": "vllm"}, report_dir)


def _artifact(tmp_path, weights: bytes):
    folder = tmp_path / "fp8"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text("{}")
    return folder


def test_a_verification_vouches_only_for_the_bytes_it_served(tmp_path):
    artifact = _artifact(tmp_path, b"weights-1")
    served = content_digest(artifact)
    stage = _verify_stage(tmp_path, artifact, served)
    artifact_stage = Stage("fp8", "quantize", ("merged",), {}, artifact)
    entry = {"id": stage.id, "kind": "verify", "action": "not selected", "status": "ok"}

    (artifact / "README.md").write_text("a card rewritten by every run")  # not content: still the same bytes
    fresh = _verification(stage, dict(entry), artifact)
    assert fresh["verdict"] == "passed"
    assert artifact_state(artifact_stage, {"status": "ok"}, [dict(entry)], [fresh])[0] == "served"

    (artifact / "model.safetensors").write_bytes(b"weights-2")  # rebuilt: same names, other bytes
    old = _verification(stage, dict(entry), artifact)
    entries = [dict(entry)]
    _mark_stale(entries, [old])
    state, reason = artifact_state(artifact_stage, {"status": "ok"}, entries, [old])
    assert old["verdict"] == "stale" and entries[0]["status"] == "stale"
    assert state == "checked" and reason == f"verify-fp8-vllm: {STALE_REASON}"


def test_a_report_without_the_digest_it_served_vouches_for_nothing(tmp_path):
    artifact = _artifact(tmp_path, b"weights")
    stage = _verify_stage(tmp_path, artifact, None)
    assert _verification(stage, {"status": "ok"}, artifact)["verdict"] == "stale"


@pytest.mark.parametrize("require, state, kernels, meets", [
    ("checked", "checked", "native", True), ("checked", "served", "reference", True), ("checked", "failed", "native", False),
    ("served", "checked", "native", False), ("served", "served", "reference", True),
    ("served-native", "served", "reference", False), ("served-native", "served", "native", True),
])
def test_requirements(require, state, kernels, meets):
    assert meets_requirement(require, state, kernels) is meets


# ---------------------------------------------------------------- the context the engine serves

class _Models:
    def __init__(self, entry):
        self.model, self.entry = "m", entry

    def get(self, path):
        assert path == "/v1/models"
        return {"data": [{"id": "m", **self.entry}]}


def _server(max_model_len=None, default=None):
    return SimpleNamespace(max_model_len=max_model_len, spec=SimpleNamespace(name="engine", default_max_len=default))


def test_the_served_context_comes_from_the_engine_first():
    assert served_context(_Models({"max_model_len": 4096}), _server(8192, 2048))[0] == 4096
    assert served_context(_Models({}), _server(8192, 2048)) == (8192, "--max-model-len 8192")
    assert served_context(_Models({}), _server(None, 2048))[0] == 2048
    assert served_context(_Models({}), _server())[0] is None


def test_a_long_context_probe_past_what_the_engine_serves_is_not_checked_rather_than_failed():
    from workbench.verify.chat import ChatFacts
    from workbench.verify.run import _long_context_check

    facts = ChatFacts(long_prompt="def main(" * 10, long_tokens=4150, original_context=4096, long_note="rope longrope")
    check = _long_context_check(_Models({"max_model_len": 4096}), _server(), Probing(kind="full"), facts)
    assert check.status == "incomplete" and check.metrics == {"served_context": 4096, "needed": 4150 + 24}
    assert "not checked" in check.detail and "4096" in check.detail


# ---------------------------------------------------------------- accepted tokenizer differences

class _Tokenizer:
    """An engine's tokenize endpoint that answers fixed ids per text, with a BOS first as llama.cpp's does."""

    model = "m"

    def __init__(self, ids_by_text):
        self.ids_by_text = ids_by_text

    def post(self, path, body):
        return {"tokens": [1, *self.ids_by_text[body["input"]]]}


def _tokenizer_check(engine_ids, recorded):
    from workbench.engines import LLAMACPP_TOKENIZE
    from workbench.verify.chat import ChatFacts, probe_tokenizer

    facts = ChatFacts(bos_id=1, texts={"a b": (5, 6), "c": (7,)}, pieces=tuple(f"t{i}" for i in range(10)),
                      known_differences=recorded)
    return probe_tokenizer(_Tokenizer(engine_ids), facts, LLAMACPP_TOKENIZE)


def test_a_tokenizer_difference_passes_only_exactly_as_recorded():
    same = _tokenizer_check({"a b": [5, 6], "c": [7]}, {})
    assert same.status == "passed" and same.metrics == {"texts": 2, "accepted_differences": 0}
    recorded = {"a b": ((5, 6), (5, 8, 6))}
    accepted = _tokenizer_check({"a b": [5, 8, 6], "c": [7]}, recorded)
    assert accepted.status == "passed" and accepted.metrics["accepted_differences"] == 1
    # another split of the recorded text, or a difference on a text not recorded: failed, every text looked at
    other_split = _tokenizer_check({"a b": [5, 9, 6], "c": [7]}, recorded)
    unrecorded = _tokenizer_check({"a b": [5, 8, 6], "c": [8]}, recorded)
    assert other_split.status == "failed" and "1/2 texts" in other_split.detail
    assert unrecorded.status == "failed" and "'c'" in unrecorded.detail and "'a b'" not in unrecorded.detail
    assert _tokenizer_check({"a b": [9], "c": [9]}, {}).detail.startswith("2/2 texts")


@pytest.mark.parametrize("item, message", [("max_p99_logprob_deltas=0.3", "is not a verify gate"),
                                           ("max_p99_logprob_delta=high", "the value must be a number")])
def test_a_gate_named_on_the_command_line_must_be_a_verify_gate_with_a_number(tmp_path, item, message):
    from conftest import assert_one_line_error, run

    assert_one_line_error(run("verify", tmp_path, "--server", "vllm", "--gate", item), 2, message)


@pytest.mark.parametrize("user, applied", [(None, "CPUFp8PerTensorScaledMMLinearKernel"),
                                           ("MyKernel", "MyKernel,CPUFp8PerTensorScaledMMLinearKernel"),
                                           ("CPUFp8PerTensorScaledMMLinearKernel", "CPUFp8PerTensorScaledMMLinearKernel")])
def test_the_reference_kernels_settings_join_the_users_own_and_are_recorded(monkeypatch, user, applied):
    """On an AMX CPU vLLM's per-tensor FP8 kernel ignores the static input scale: a user's VLLM_DISABLED_KERNELS
    keeps its kernels and gains that one, and the report (applied_env) says what the engine got."""
    from workbench.engines import ENGINES
    from workbench.verify.command import EngineCommand

    if user is None:
        monkeypatch.delenv("VLLM_DISABLED_KERNELS", raising=False)
    else:
        monkeypatch.setenv("VLLM_DISABLED_KERNELS", user)
    vllm = ENGINES["vllm"]
    server = EngineCommand(vllm, "/m", python="/usr/bin/python3", gpu=False, cpus=[0], reference_kernels=vllm.reference_kernels["fp8"])
    assert server.applied_env["VLLM_DISABLED_KERNELS"] == applied


def test_a_merged_artifact_is_compared_with_peft_only_while_its_inputs_are_those_it_was_merged_from(llama, llama_lora, tmp_path):
    """verify's default reference for a merge: its base + adapter through peft while both hash as the manifest
    records; an adapter changed since the merge makes it the artifact itself, with the reason."""
    import shutil

    from conftest import run
    from workbench.verify.run import default_reference

    adapter = tmp_path / "adapter"
    shutil.copytree(llama_lora, adapter)
    assert run("merge", llama, adapter, "--out", tmp_path / "merged").exit_code == 0
    choice = default_reference(tmp_path / "merged", "full")
    assert (choice.model, choice.adapter, choice.by) == (llama.resolve(), adapter.resolve(), "peft: base + adapter"), choice
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 16', '"lora_alpha": 32'))
    choice = default_reference(tmp_path / "merged", "full")
    assert choice.model == tmp_path / "merged" and choice.adapter is None and choice.by == "transformers"
    assert "adapter changed since the merge" in choice.note, choice.note


def test_the_cards_command_leaves_out_this_machines_cpu_flags_with_or_without_values():
    argv = ["/py", "-m", "sglang.launch_server", "--model-path", "/out/m", "--host", "127.0.0.1", "--port", "3000",
            "--tp", "2", "--max-total-tokens", "65536", "--sleep-on-idle", "--dtype", "bfloat16"]
    command = "python -m sglang.launch_server --model-path org/m --tp 2"
    cpu_only = ["--max-total-tokens", "65536", "--sleep-on-idle"]
    assert serving_command("sglang", argv, "org/m", cpu_only) == command + " --dtype bfloat16"
    assert serving_command("sglang", argv, "org/m", []) == command + " " + " ".join(cpu_only + ["--dtype", "bfloat16"])
