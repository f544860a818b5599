"""`workbench release`: the release file's checks, the end-to-end release of the fixture on real engines
(merge -> fp8-static + w8a8 + GGUF Q8_0 -> vLLM TP=1 and TP=2, llama.cpp), caching, --only/--force/--dry-run,
a failing gate, and SIGKILL at named points of a run followed by a re-run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import assert_one_line_error, run
from releases import (RELEASE_FILE, ROOT, WORKBENCH, artifact_hashes, reduced, release, release_json, report_of,
                      write_release)
from workbench.process import session_alive
from workbench.release.kinds import ENGINE_GROUPS

FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}


@pytest.fixture(autouse=True)
def fixtures_env(fixture_root):
    """The example release file finds the fixture models through $WORKBENCH_FIXTURES (fixture_root sets it)."""


# ---------------------------------------------------------------- the release file, before anything runs

@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(colour="blue"), "unknown key 'colour'"),
    (lambda d: d["artifacts"]["fp8"].update({"from": "mergd"}), "artifact 'fp8' is made from 'mergd', which is not defined"),
    (lambda d: d["verify"].append({"artifact": "awq", "engine": "vllm"}), "verify[6]: artifact 'awq' is not defined"),
    (lambda d: d["verify"].append({"artifact": "adapter", "engine": "llamacpp"}), "llamacpp does not serve adapters unmerged"),
    (lambda d: d["verify"][-1].update(dp=0), "dp must be a positive integer"),
    (lambda d: d["artifacts"].update(adapter={"gguf": "f16"}), "artifacts.adapter: 'source' and 'adapter' are reserved ids"),
    (lambda d: d["verify"].append({"artifact": "merged", "engine": "tgi"}), "unknown engine 'tgi'"),
    (lambda d: d["verify"].append({"artifact": "q8_0", "engine": "vllm"}), "vllm serves a model folder; 'q8_0' is a .gguf"),
    (lambda d: d["artifacts"]["fp8"]["quantize"].update(smaples=3), "artifacts.fp8.quantize: unknown key 'smaples'"),
    (lambda d: d["artifacts"]["fp8"]["quantize"].update(samples="many"), "samples must be a int, got str"),
    (lambda d: d["artifacts"].update(q="x"), "artifacts.q must be a mapping"),
    (lambda d: d["artifacts"].update(q4={"gguf": "q9_9"}), "unknown gguf type 'q9_9'"),
    (lambda d: d["artifacts"].update(again={"gguf": "q8_0"}), "q8_0 is already built by 'q8_0'"),
    (lambda d: d["artifacts"].update(iq={"gguf": "iq3_xxs"}), "llama.cpp makes IQ3_XXS only with an importance matrix"),
    (lambda d: d["artifacts"]["q8_0"].update(imatrix="default"), "imatrix applies to llama.cpp's quantize types, not to Q8_0"),
    (lambda d: d["artifacts"]["fp8"].update(imatrix="default"), "artifacts.fp8: imatrix goes with gguf"),
    (lambda d: d["artifacts"]["fp8"].update(tensor_types={"attn_v": "q8_0"}), "artifacts.fp8: tensor_types goes with gguf"),
    (lambda d: d["artifacts"]["q8_0"].update(tensor_types={"attn_v": "q9"}), "unknown GGML type 'q9'"),
    (lambda d: d["artifacts"].update(a={"from": "b", "gguf": "f16"}, b={"from": "a", "gguf": "bf16"}), "cycle"),
    (lambda d: d["artifacts"].update(both={"gguf": "f16", "quantize": {"recipe": "fp8"}}), "exactly one of merge, quantize, gguf"),
    (lambda d: d["artifacts"].update(fq={"from": "q8_0", "quantize": {"recipe": "fp8"}}), "'q8_0' is a .gguf file"),
    (lambda d: d.pop("adapter"), "merge needs an adapter"),
    (lambda d: d.update(base="${WB_NOT_SET_ANYWHERE}/llama"), "names an environment variable that is not set"),
    (lambda d: d["gates"].update(min_token_agreement=0.9), None),  # verify gates are allowed at the top too
    (lambda d: d["artifacts"]["fp8"]["quantize"].update(gates={"min_token_agreement": 0.9}), "'min_token_agreement' does not apply here"),
    (lambda d: d["verify"][0].update(tp=[0]), "tp must be a positive integer"),
    (lambda d: d["verify"].append(dict(d["verify"][0])), "stage id 'verify-merged-vllm' is taken"),
    (lambda d: d["artifacts"]["merged"]["merge"].update(dtype="int3"), "dtype must be one of auto, bf16, fp16, fp32"),
    (lambda d: d.update(verify=[e for e in d["verify"] if e["artifact"] != "fp8"]),
     "artifacts.fp8 must be served (the default) but no verify entry names it"),
    (lambda d: d["artifacts"]["fp8"].update(require="served-native"), None),
    (lambda d: d["artifacts"]["fp8"].update(require="checked"), "artifacts.fp8: `require: checked` needs a `reason`"),
    (lambda d: d["artifacts"]["fp8"].update(require="ready"), "require must be one of served, served-native, checked, got 'ready'"),
    (lambda d: d["artifacts"]["merged"].update(reason="x"), "artifacts.merged: `reason` goes with `require: checked`"),
])
def test_bad_release_file_fails_before_anything_runs(tmp_path, edit, message):
    path = write_release(tmp_path, edit)
    out = tmp_path / "out"
    result = run("release", path, "--out", out, "--dry-run")
    if message is None:
        assert result.exit_code == 0, result.stderr
        return
    assert_one_line_error(result, 2, message)
    assert not out.exists()


def test_missing_or_malformed_file(tmp_path):
    assert_one_line_error(run("release", tmp_path / "nope.yaml"), 2, "release file not found")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    assert_one_line_error(run("release", tmp_path / "bad.yaml"), 2, "bad.yaml is not valid YAML")


def test_dry_run_of_a_fresh_release_runs_everything_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = run("release", RELEASE_FILE, "--out", out, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [p["id"] for p in plan] == ["merged", "fp8", "w8a8", "q8_0", "verify-merged-vllm", "verify-merged-sglang", "verify-fp8-vllm",
                                       "verify-w8a8-vllm", "verify-q8_0-llamacpp", "verify-adapter-vllm"]
    assert all(p["run"] for p in plan)
    assert plan[0]["reason"] == "no finished output" and plan[1]["reason"] == "decided after merged is built"
    assert not out.exists()


def test_gguf_tensor_types_in_a_release_file_are_part_of_its_stage_key(tmp_path):
    """`tensor_types` and `output_tensor_type` on a gguf artifact change its key; a file without them keeps its own."""
    keys = {}
    for name, extra in (("plain", {"from": "source"}),
                        ("typed", {"from": "source", "tensor_types": {"attn_v": "F16"}, "output_tensor_type": "q8_0"})):
        (tmp_path / name).mkdir()
        path = write_release(tmp_path / name, lambda d: d["artifacts"]["q8_0"].update(extra))
        result = run("release", path, "--out", tmp_path / "out", "--dry-run", "--json", "--only", "q8_0")
        assert result.exit_code == 0, result.stderr
        keys[name] = {p["id"]: p["key"] for p in json.loads(result.stdout)}
    assert keys["plain"]["q8_0"] and keys["typed"]["q8_0"] and keys["plain"]["q8_0"] != keys["typed"]["q8_0"]


def test_kv_cache_in_a_release_file_is_part_of_its_stage_key(tmp_path):
    """`kv_cache: fp8` in a quantize section changes that stage's key; releases without it keep theirs (the
    option is recorded only when given); a kind the workbench does not write is refused before anything runs."""
    def from_source(d, **quantize):
        d["artifacts"]["fp8"].update({"from": "source"})
        d["artifacts"]["fp8"]["quantize"].update(quantize)

    keys = {}
    for name, extra in (("plain", {}), ("kv", {"kv_cache": "fp8"})):
        (tmp_path / name).mkdir()
        path = write_release(tmp_path / name, lambda d: from_source(d, **extra))
        result = run("release", path, "--out", tmp_path / "out", "--dry-run", "--json", "--only", "fp8")
        assert result.exit_code == 0, result.stderr
        keys[name] = json.loads(result.stdout)[0]["key"]
    assert keys["plain"] and keys["kv"] and keys["plain"] != keys["kv"]
    path = write_release(tmp_path, lambda d: from_source(d, kv_cache="int8"))
    assert_one_line_error(run("release", path, "--out", tmp_path / "out", "--dry-run", "--only", "fp8"), 2,
                          "kv_cache must be one of fp8, got 'int8'")


def test_output_not_made_by_the_release_is_not_clobbered(tmp_path):
    out = tmp_path / "out"
    foreign = out / "tiny-llama-lora-merged"
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep")
    assert_one_line_error(run("release", RELEASE_FILE, "--out", out, "--only", "merged"), 2,
                          "output exists and was not made by release 'tiny-llama-lora'")
    assert (foreign / "mine.txt").read_text() == "keep"


# ---------------------------------------------------------------- end to end on real engines

@pytest.mark.slow
@pytest.mark.engine
def test_release_end_to_end(released, figures):
    out, index, seconds = released
    assert index["passed"] and index["exit_code"] == 0, json.dumps(index["stages"], indent=2)
    assert [s["action"] for s in index["stages"]] == ["built"] * 10
    a = index["artifacts"]
    # served where an engine loaded it; FP8 by vLLM's own loader with the workbench's reference kernels, and says so
    assert {i: x["state"] for i, x in a.items()} == {"merged": "served", "fp8": "served", "w8a8": "served", "q8_0": "served"}
    assert {i: x["kernels"] for i, x in a.items()} == {"merged": "native", "fp8": "reference", "w8a8": "native", "q8_0": "native"}
    assert "vllm tp=1 with the workbench's reference kernels" in a["fp8"]["state_reason"] and a["fp8"]["ready"]
    assert all(x["ready"] == (x["state"] == "served") for x in a.values())
    # the seed's FP8 format, exactly
    fp8_config = json.loads((out / "tiny-llama-lora-fp8" / "config.json").read_text())
    assert fp8_config["quantization_config"] == FP8_CONFIG
    assert a["fp8"]["quality"]["top1_agreement"] >= 0.95 and a["fp8"]["quality"]["ppl_delta"] <= 0.01
    # every verify matrix cell ran on the real engine and compared with the reference
    runs = {(v["engine"], r["tp"]): r for x in a.values() for v in x["verifications"] for r in v["runs"]}
    assert set(runs) == {("vllm", 1), ("vllm", 2), ("sglang", 1), ("sglang", 2), ("llamacpp", 1)}
    cells = {(artifact, v["engine"], r["tp"]): r for artifact, x in a.items() for v in x["verifications"] for r in v["runs"]}
    assert set(cells) == {("merged", "vllm", 1), ("merged", "vllm", 2), ("merged", "sglang", 1), ("merged", "sglang", 2),
                          ("fp8", "vllm", 1), ("w8a8", "vllm", 1), ("q8_0", "llamacpp", 1)}
    for cell, r in cells.items():
        assert r["passed"] and r["checks"]["reference"] == "passed" and r["token_agreement"] >= 0.9, (cell, r)
    assert index["engines"]["vllm"] and index["engines"]["sglang"] == "0.5.15" and index["engines"]["llamacpp"]
    for (artifact, engine, tp), r in cells.items():
        figures[f"release {artifact} on {engine} tp={tp}"] = {"token_agreement": r["token_agreement"],
                                                              "max_logprob_delta": r["max_logprob_delta"]}
    figures["release fixture uninterrupted"] = {"seconds": round(seconds, 1),
                                                **{s["id"]: s["seconds"] for s in index["stages"]}}
    # CI files
    junit = (out / "reports" / "junit.xml").read_text()
    assert 'name="build" tests="4" failures="0"' in junit and "verify-merged-vllm: vllm tp=2" in junit
    assert "| merged | merge | ok |" in (out / "reports" / "summary.md").read_text()
    assert json.loads((out / "release.json").read_text())["artifacts"].keys() == a.keys()
    # the adapter served unmerged by vLLM at DP=2, scored by peft; concurrent replies equal the ones sent alone
    unmerged = json.loads((out / "reports" / "verify-adapter-vllm" / "report.json").read_text())
    checks = {c["name"]: c for c in unmerged["runs"][0]["checks"]}
    assert unmerged["verdict"] == "passed" and unmerged["dp"] == 2 and "--lora-modules" in unmerged["runs"][0]["argv"]
    lora, load = checks["reference:tiny-llama-lora"]["metrics"], checks["concurrency"]["metrics"]
    assert lora["token_agreement"] >= 0.95 and load["identical_replies"] == 8
    # the adapter changes the replies, so agreeing with peft proves the engine applied it
    assert checks["adapter:tiny-llama-lora"]["detail"].split(": ", 1)[1] != checks["completion"]["detail"].split(": ", 1)[1]
    figures["release adapter unmerged on vllm dp=2 vs peft"] = {"startup_s": unmerged["runs"][0]["startup_seconds"], **lora}
    figures["release concurrency vllm dp=2, 8 requests"] = load


def _card(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


@pytest.mark.slow
@pytest.mark.engine
def test_model_cards_and_manifests(released):
    out, index, _ = released
    meta, body = _card(out / "tiny-llama-lora-merged" / "README.md")
    assert meta["base_model"] == "workbench-fixtures/tiny-llama" and meta["library_name"] == "transformers"
    assert meta["base_model_relation"] == "finetune" and "lora" in meta["tags"]
    # the proven commands as users run them, per TP size, without the private host/port or CPU-only settings
    commands = [line for line in body.splitlines() if line.startswith("vllm serve")]
    assert commands == ["vllm serve tiny-llama-lora-merged --enforce-eager",
                        "vllm serve tiny-llama-lora-merged --tensor-parallel-size 2 --enforce-eager"]
    assert "--port" not in body and "State: **served**" in body
    on_cpu = body.split("On CPU", 1)[1]  # this machine's settings, apart
    assert "VLLM_CPU_KVCACHE_SPACE=1" in on_cpu and "VLLM_CPU_OMP_THREADS_BIND=" in on_cpu
    assert "VLLM_CPU" not in body.split("On CPU", 1)[0]
    assert "python -m sglang.launch_server --model-path tiny-llama-lora-merged --tp 2\n" in body  # no KV cap: CPU only
    assert "SGLANG_USE_CPU_ENGINE=1" in on_cpu and "--max-total-tokens 65536 --sleep-on-idle" in on_cpu
    meta, body = _card(out / "tiny-llama-lora-fp8" / "README.md")
    assert meta["base_model"] == "tiny-llama-lora-merged" and meta["base_model_relation"] == "quantized"
    assert meta["quantization"]["quant_method"] == "fp8" and meta["quantization"]["scheme"] == "static"
    q = index["artifacts"]["fp8"]["quality"]
    assert f"{q['ppl_source']:.3f}" in body and f"{q['top1_agreement']:.2%}" in body
    assert "State: **served**" in body and "Kernels: reference: vLLM's own loader" in body
    # verify --eval (the entry's `eval:`): lm-eval on the FP8 artifact and on the merge served the same way
    check = {c["name"]: c for c in report_of(out, "verify-fp8-vllm")["runs"][0]["checks"]}["eval"]
    acc = check["metrics"]["recovery"]["python_next_chars"]["acc"]
    assert check["status"] == "passed" and acc["recovery"] >= 0.9 and acc["source"] > 0.25, check
    assert f"| vllm | 1 | python_next_chars | acc | {acc['artifact']:.4g} | {acc['source']:.4g} |" in body
    meta, body = _card(out / "tiny-llama-lora-w8a8" / "README.md")
    assert meta["quantization"]["quant_method"] == "compressed-tensors" and "vllm | 0.32.0 | 1 | passed" in body
    held_out = re.search(r"vllm \| 0\.32\.0 \| 1 \| passed \| [\d.]+% \| [\d.]+ \| (\d+) \| [\d.]+ / [\d.]+ \| [\d.]+% \|", body)
    assert held_out and int(held_out.group(1)) >= 2048, body  # the engine's own logprobs on held-out text, on the card
    meta, body = _card(out / "tiny-llama-lora-GGUF" / "README.md")
    assert meta["library_name"] == "gguf" and "python -m llama_cpp.server --model tiny-llama-lora-Q8_0.gguf --interrupt_requests False\n" in body
    assert "bits per weight over all tensors; every matrix in the file type's own types" in body
    # verification results in the artifact's own manifest, which still checks out file by file
    manifest = json.loads((out / "tiny-llama-lora-merged" / "workbench.json").read_text())
    assert [(v["engine"], [r["tp"] for r in v["runs"]]) for v in manifest["verifications"]] == [("vllm", [1, 2]), ("sglang", [1, 2])]
    assert "README.md" in manifest["files"]
    assert manifest["steps"][-1]["release"]["stage"] == "merged"
    shown = run("inspect", out / "tiny-llama-lora-merged")
    assert "served by vllm 0.32.0 tp=2: passed" in shown.output and "served by sglang 0.5.15 tp=2: passed" in shown.output
    assert "state         served: served by vllm tp=1,2; sglang tp=1,2" in shown.output
    assert "with the workbench's reference kernels" in run("inspect", out / "tiny-llama-lora-fp8").output
    for folder in ("tiny-llama-lora-merged", "tiny-llama-lora-fp8", "tiny-llama-lora-w8a8", "tiny-llama-lora-GGUF/tiny-llama-lora-Q8_0.gguf"):
        result = run("inspect", out / folder, "--check")
        assert result.exit_code == 0, (folder, result.output, result.stderr)


@pytest.mark.slow
@pytest.mark.engine
def test_inspect_check_catches_a_flipped_byte_in_a_released_gguf(released, tmp_path):
    out, _, _ = released
    gguf = out / "tiny-llama-lora-GGUF" / "tiny-llama-lora-Q8_0.gguf"
    copy = tmp_path / gguf.name
    shutil.copy(gguf, copy)
    shutil.copy(gguf.with_name(gguf.name + ".workbench.json"), tmp_path)
    assert run("inspect", copy, "--check").exit_code == 0
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    result = run("inspect", copy, "--check")
    assert result.exit_code == 1 and "sha256" in result.stderr


@pytest.mark.slow
@pytest.mark.engine
def test_second_run_is_all_cached_and_only_force_redoes(released, tmp_path):
    out = tmp_path / "again"  # the shared release stays as built for the other tests
    shutil.copytree(released[0], out, symlinks=True)
    before = artifact_hashes(out)
    shard = out / "tiny-llama-lora-merged" / "model-00001-of-00003.safetensors"
    written = shard.stat().st_mtime_ns
    again = release_json(RELEASE_FILE, "--out", out)
    assert [s["action"] for s in again["stages"]] == ["cached"] * 10 and again["passed"]
    assert artifact_hashes(out) == before and shard.stat().st_mtime_ns == written
    redo = release_json(RELEASE_FILE, "--out", out, "--only", "verify-q8_0-llamacpp", "--force")
    actions = {s["id"]: s["action"] for s in redo["stages"]}
    assert actions["verify-q8_0-llamacpp"] == "built" and actions["q8_0"] == "cached"
    assert actions["merged"] == "cached" and actions["fp8"] == "not selected" and redo["passed"]


@pytest.mark.slow
@pytest.mark.engine
def test_a_changed_option_reruns_that_stage_and_what_reads_it(released, tmp_path):
    out, _, _ = released

    def more_samples(d):
        d["artifacts"]["w8a8"]["quantize"]["samples"] = 16
        d["output"] = str(out)
    path = write_release(tmp_path, more_samples)
    result = run("release", path, "--dry-run", "--json")
    plan = {p["id"]: p for p in json.loads(result.stdout)}
    assert plan["w8a8"]["run"] and plan["w8a8"]["reason"] == "inputs, options or tool versions changed"
    assert plan["verify-w8a8-vllm"]["run"] and plan["verify-w8a8-vllm"]["reason"] == "decided after w8a8 is built"
    assert [i for i, p in plan.items() if p["run"]] == ["w8a8", "verify-w8a8-vllm"]


@pytest.mark.slow
@pytest.mark.engine
def test_a_rebuilt_artifact_is_never_served_on_its_old_verification(released, tmp_path):
    """`--only fp8` after a recipe change rebuilds FP8 but not its verification: the old report served other
    bytes, so the index, the card and inspect call FP8 checked (stale verification), while the merged model,
    whose bytes are unchanged, stays served."""
    out = tmp_path / "out"
    shutil.copytree(released[0], out, symlinks=True)

    def fewer_samples(d):
        d["artifacts"]["fp8"]["quantize"]["samples"] = 16
        d["output"] = str(out)
    index = release_json(write_release(tmp_path, fewer_samples), "--only", "fp8")
    stages = {s["id"]: s for s in index["stages"]}
    assert stages["fp8"]["action"] == "built" and stages["verify-fp8-vllm"]["action"] == "not selected"
    fp8, merged = index["artifacts"]["fp8"], index["artifacts"]["merged"]
    assert stages["verify-fp8-vllm"]["status"] == "stale", stages["verify-fp8-vllm"]
    assert fp8["state"] == "checked" and "other bytes" in fp8["state_reason"] and not fp8["ready"], fp8
    assert [v["verdict"] for v in fp8["verifications"]] == ["stale"]
    assert merged["state"] == "served" and merged["ready"]
    assert "State: **checked**" in (out / "tiny-llama-lora-fp8" / "README.md").read_text()
    assert "| fp8 | quantize | ok |" in (out / "reports" / "summary.md").read_text()
    inspected = json.loads(run("inspect", out / "tiny-llama-lora-fp8", "--json").stdout)
    assert inspected["state"] == "checked" and not inspected["verifications"][0]["of_these_bytes"], inspected
    assert json.loads(run("inspect", out / "tiny-llama-lora-merged", "--json").stdout)["state"] == "served"


@pytest.mark.slow
@pytest.mark.engine
def test_a_failed_gate_blocks_what_reads_it_and_is_redone_next_time(fixture_root, tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text(f"""
name: strict
base: {fixture_root / 'llama'}
output: out
artifacts:
  fp8: {{quantize: {{recipe: fp8-static, samples: 8, seq_len: 64, gates: {{min_top1: 0.9999}}}}}}
  f16: {{gguf: f16, require: checked, reason: not verified in this test}}
verify:
  - {{artifact: fp8, engine: vllm}}
""")
    result = release(path, "-q")
    assert result.returncode == 1, result.stderr
    index = json.loads((tmp_path / "out" / "release.json").read_text())
    by_id = {s["id"]: s for s in index["stages"]}
    assert by_id["fp8"]["action"] == "failed" and "quality gates failed: min_top1" in by_id["fp8"]["error"]
    assert by_id["verify-fp8-vllm"]["action"] == "blocked" and by_id["f16"]["action"] == "built"
    fp8, f16 = index["artifacts"]["fp8"], index["artifacts"]["f16"]
    assert fp8["state"] == "failed" and "quality gates failed" in fp8["state_reason"] and not fp8["ready"]
    assert f16["state"] == "checked" and f16["state_reason"] == "not verified in this test" and f16["meets_requirement"]
    assert 'failures="1"' in (tmp_path / "out" / "reports" / "junit.xml").read_text()
    assert "fp8: failed" in result.stderr and "FAILED: release strict" in result.stderr
    assert Path(by_id["fp8"]["log"]).read_text().count("FAILED: quality gates failed") == 1
    plan = {p["id"]: p for p in json.loads(run("release", path, "--dry-run", "--json").stdout)}
    assert plan["fp8"]["run"] and plan["fp8"]["reason"] == "last run failed" and not plan["f16"]["run"]


@pytest.mark.slow
@pytest.mark.engine
def test_a_release_over_a_local_two_node_ray_cluster_equals_the_plain_run(released, tmp_path, figures):
    """The reduced example (every stage kind, one engine start per engine) over Ray: the same artifacts, byte for
    byte, as the plain run of the full example, the same states, every Ray process gone."""
    out, plain, _ = released
    path = write_release(tmp_path, reduced)
    t0 = time.monotonic()
    result = release(path, "--out", tmp_path / "ray", "--ray", "local:2", "--json", timeout=1200)
    seconds = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    index = json.loads(result.stdout)
    planned = [p["id"] for p in json.loads(run("release", path, "--out", tmp_path / "plan", "--dry-run", "--json").stdout)]
    cluster = index["cluster"]
    assert cluster["nodes"] == 2 and [j["id"] for j in cluster["jobs"]] == planned
    assert all(j["exit_code"] == 0 for j in cluster["jobs"]), cluster["jobs"]
    assert len({j["node"] for j in cluster["jobs"]}) == 2  # independent stages ran on both nodes
    assert all(not session_alive(sid) for sid in cluster["local_node_sessions"])  # every Ray process is gone
    assert {s["id"]: s["action"] for s in index["stages"]} == {i: "fetched" for i in planned}
    states = {i: (a["state"], a["kernels"]) for i, a in index["artifacts"].items() if i != "fp8"}
    assert states == {i: (plain["artifacts"][i]["state"], plain["artifacts"][i]["kernels"]) for i in states}
    assert index["artifacts"]["fp8"]["state"] == "checked"  # built and gated; served in the full example
    verdicts = {(v["engine"], r["tp"]): v["verdict"] for v in index["artifacts"]["merged"]["verifications"] for r in v["runs"]}
    assert verdicts == {("vllm", 1): "passed"}
    ray_hashes = {k: v for k, v in artifact_hashes(tmp_path / "ray").items() if not k.startswith("store/")}  # its default store
    assert ray_hashes and artifact_hashes(out).items() >= ray_hashes.items()
    manifest = json.loads((tmp_path / "ray" / "tiny-llama-lora-merged" / "workbench.json").read_text())
    assert manifest["state"]["cluster"] == {"ray": cluster["ray"], "nodes": 2}
    figures["reduced release over a local 2-node Ray cluster"] = {"ray s": round(seconds, 1), "ray": cluster["ray"],
                                                                 "stages": len(planned)}


# ---------------------------------------------------------------- SIGKILL at named points, then a re-run

def _live_engine_groups(root: Path) -> list[int]:
    """The process groups of the engines this release started (each guard records its group before it
    starts the engine) that still have a process."""
    record = root / "reports" / ENGINE_GROUPS
    groups = [int(x) for x in record.read_text().split()] if record.exists() else []
    alive = []
    for pgid in groups:
        try:
            os.killpg(pgid, 0)
            alive.append(pgid)
        except ProcessLookupError:
            pass
    return alive


# Where each run is killed: the first line of the release's progress (stderr) that contains the text. Each run
# resumes where the last stopped, so these walk through every kind of stage: mid-merge, right after a stage is
# recorded as built, mid-quantization, mid-conversion, while an engine starts and while it is probed.
KILL_AT = ("merging", "merged: built", "fp8 (quantize)", "q8_0 (gguf)", "starting vllm", "ready in")


def _run_until(release_file: Path, root: Path, event: str) -> bool:
    """Run the release and SIGKILL it on the progress line holding ``event``; False if it ended first."""
    proc = subprocess.Popen([WORKBENCH, "release", str(release_file), "--out", str(root)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if event in line:
                proc.send_signal(signal.SIGKILL)
                return True
        return False
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.slow
@pytest.mark.engine
def test_sigkill_at_named_points_then_rerun_gives_identical_artifacts(released, tmp_path, figures):
    out, _, _ = released
    root = tmp_path / "killed"
    release_file = write_release(tmp_path, reduced)
    kills, finished = [], []  # where each run was killed, and the stages finished after each kill
    for event in KILL_AT:
        if not _run_until(release_file, root, event):
            continue
        kills.append(event)
        # the engines the release had started go down with it (the guard's grace period is 10 s)
        deadline = time.monotonic() + 30
        while _live_engine_groups(root) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _live_engine_groups(root), (event, _live_engine_groups(root))
        finished.append(sum(not p["run"] for p in json.loads(run("release", release_file, "--out", root, "--dry-run", "--json").stdout)))
    assert kills == list(KILL_AT), kills  # every named point was reached and killed at
    # what a re-run would redo is exactly what it redoes
    plan = {p["id"]: p["run"] for p in json.loads(run("release", release_file, "--out", root, "--dry-run", "--json").stdout)}
    assert any(plan.values()), (kills, "the kills left nothing unfinished")
    index = release_json(release_file, "--out", root)
    assert index["passed"], (kills, json.dumps(index["stages"], indent=2))
    actions = {s["id"]: s["action"] for s in index["stages"]}
    for stage_id, will_run in plan.items():
        assert actions[stage_id] == ("built" if will_run else "cached"), (kills, stage_id, plan, actions)
    rebuilt = artifact_hashes(root)
    assert rebuilt and artifact_hashes(out).items() >= rebuilt.items(), kills  # the same bytes as the uninterrupted run
    assert (root / "reports" / ENGINE_GROUPS).exists() and not _live_engine_groups(root)
    assert not [p for p in root.rglob("*") if ".partial-" in p.name or ".replaced-" in p.name]
    figures["release SIGKILL test"] = {"kills_at": str(kills), "stages_finished_after_each": str(finished),
                                       "redone": sum(a == "built" for a in actions.values()),
                                       "cached": sum(a == "cached" for a in actions.values())}


def test_example_ci_workflow_runs_the_release_and_keeps_its_reports():
    workflow = yaml.safe_load((ROOT / "examples" / "release-ci.yml").read_text())
    steps = workflow["jobs"]["release"]["steps"]
    commands = "\n".join(s.get("run", "") for s in steps)
    assert "scripts/setup.sh" in commands and 'workbench release "$RELEASE_FILE" -q --json' in commands
    by_uses = {s.get("uses", "").split("@")[0]: s for s in steps}
    assert by_uses["mikepenz/action-junit-report"]["with"]["report_paths"].endswith("/reports/junit.xml")
    upload = by_uses["actions/upload-artifact"]
    assert upload["if"].startswith("always()") and "/reports/" in upload["with"]["path"]
    publish = next(s for s in steps if s.get("name", "").startswith("Publish the served artifacts"))
    assert publish["if"] == "success()" and 'a["state"] == "served"' in publish["run"]
