"""verify --eval: lm-evaluation-harness on the served artifact and on its source, recovery per task and metric.
The example release's FP8 entry runs it on vLLM against the merge served the same way (test_release reads it);
here the GGUF on llama.cpp against its source by transformers, the merge's source through peft, the gate."""

from __future__ import annotations

import json
import math

import pytest

from conftest import checks_of, verify_cli
from workbench.errors import BadInput
from workbench.verify.evals import EVALS, SHIPPED, lm_eval_scores, recovery_check, transformers_model


def scores(value: float, higher: bool = True) -> dict:
    return {"scores": {"t": {"acc": value}}, "higher_is_better": {"t": {"acc": higher}}}


def test_recovery_is_the_artifacts_share_of_the_sources_figure_and_gated():
    passed = recovery_check(scores(0.6), scores(0.62), 0.95)
    assert passed.status == "passed" and passed.metrics["recovery"]["t"]["acc"]["recovery"] == pytest.approx(0.6 / 0.62)
    assert recovery_check(scores(0.5), scores(0.62), 0.95).status == "failed"
    assert recovery_check(scores(2.2, False), scores(2.0, False), 0.95).status == "failed"  # lower is better: 2.0 / 2.2
    assert recovery_check(scores(math.nan), scores(0.6), 0.95).status == "failed"  # a NaN is short of any gate
    assert recovery_check({"scores": {"t": {}}, "higher_is_better": {}}, scores(0.6), 0.95).status == "incomplete"
    other_task = {"scores": {"u": {"acc": 0.6}}, "higher_is_better": {}}
    assert recovery_check(other_task, scores(0.6), 0.95).status == "failed"  # "t" was never compared
    missing = recovery_check(scores(0.6), None, 0.95, "the source did not start")
    assert missing.status == "incomplete" and "the source did not start" in missing.detail


def test_the_shipped_task_holds_four_way_choices_from_held_out_source():
    rows = [json.loads(line) for line in (EVALS / SHIPPED["python_next_chars"]["data_file"]).read_text().splitlines()]
    assert len(rows) == 200 and all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)
    assert len({r["choices"][r["label"]] for r in rows}) > 150  # not one answer over and over


def test_lm_eval_on_a_base_and_adapter_through_peft(llama, llama_lora, tmp_path):
    """What verify takes as a merge's source: lm-eval's own transformers model with the adapter through peft."""
    plain = lm_eval_scores(transformers_model(llama, "float32"), ["python_next_chars"], tmp_path / "a", limit=40)
    tuned = lm_eval_scores(transformers_model(llama, "float32", llama_lora), ["python_next_chars"], tmp_path / "b", limit=40)
    for figures in (plain, tuned):
        assert 0.25 < figures["scores"]["python_next_chars"]["acc"] <= 1  # better than chance on held-out source
    assert plain["higher_is_better"]["python_next_chars"]["acc"] is True


def test_an_eval_limit_without_tasks_is_refused(tmp_path):
    from workbench.release.spec import _eval_options

    with pytest.raises(BadInput, match="eval_limit is a positive number"):
        _eval_options({"eval_limit": 10}, "verify[0]")
    assert _eval_options({}, "verify[0]") == {}  # entries without eval keep their options and keys


@pytest.mark.slow
@pytest.mark.engine
def test_a_gguf_on_llamacpp_recovers_its_sources_accuracy(released, tmp_path, figures):
    out, _, _ = released
    gguf = next((out / "tiny-llama-lora-GGUF").glob("*Q8_0.gguf"))
    # 50 documents (llama.cpp answers lm-eval's 200 x 4 requests one at a time, ~3 minutes): one answer is ~6% of
    # the figure there, so the gate is 0.8
    result, report = verify_cli(gguf, tmp_path / "r", "--eval", "python_next_chars", "--eval-limit", "50",
                                "--gate", "min_recovery=0.8", "--concurrency", "0", server="llamacpp")
    check = checks_of(report)["eval"]
    assert result.exit_code == 0 and check["status"] == "passed", check
    assert report["eval"]["source_note"] == "the source by transformers, float32"
    acc = check["metrics"]["recovery"]["python_next_chars"]["acc"]
    assert acc["recovery"] >= 0.8 and acc["source"] > 0.2
    figures["verify --eval llama.cpp Q8_0 vs its source"] = acc


def test_a_source_lm_eval_would_hold_whole_past_the_memory_is_not_run(llama, tmp_path, monkeypatch):
    """lm-eval's transformers model loads the whole source: where that cannot fit, no source figures (the check is
    then incomplete), with the figures, and lm-eval never starts."""
    from types import SimpleNamespace

    import workbench.errors as errors
    from workbench.engines import ENGINES
    from workbench.verify.evals import Evaluation
    from workbench.verify.run import ReferenceChoice, _source_scores, _whole_model_bytes

    from workbench.checkpoint import Checkpoint

    assert _whole_model_bytes(llama, "float32") == int(1.25 * 4 * Checkpoint(llama).store.parameters)
    monkeypatch.setattr(errors, "available_memory", lambda: 1024)
    checked = SimpleNamespace(reference=ReferenceChoice(llama), spec=ENGINES["llamacpp"], artifact=tmp_path / "m.gguf")
    evaluation = Evaluation(("python_next_chars",), None, 0.95, tmp_path / "eval", llama)
    source, why = _source_scores(None, checked, evaluation, 1)
    assert source is None and "out of memory running the source whole in transformers" in why
    assert not (tmp_path / "eval").exists()
