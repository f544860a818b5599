"""A release fanned out: `--plan --json` lists the stages as jobs, each job runs its `--only` command in its
own working folder over one store, `--gather` writes the release from the store; the result equals the
one-machine run. The store refuses links and damaged entries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_one_line_error, run
from releases import WORKBENCH, artifact_hashes, release
from workbench.errors import BadInput
from workbench.release.store import Store

FANOUT_WORKFLOW = ROOT / "examples" / "release-fanout.yml"


def small_release(fixture_root: Path, folder: Path) -> Path:
    """Merge, a GGUF served by llama.cpp (split in two parts: a folder through the store), and a quantization whose gate no artifact meets (a failure that must
    cross from its job to the gathered release), calibrated on a file beside the release file."""
    (folder / "calibration.txt").write_text("def add(a, b):\n    return a + b\n\n" * 100)
    path = folder / "small.yaml"
    path.write_text(f"""
name: small
base: {fixture_root / 'llama'}
adapter: {fixture_root / 'llama-lora'}
output: out
artifacts:
  merged: {{merge: {{dtype: auto}}, require: checked, reason: served as q8_0}}
  q8_0: {{gguf: q8_0, split_max_size: 3M}}
  fp8:
    quantize: {{recipe: fp8-dynamic, samples: 8, seq_len: 64, calibration: calibration.txt, gates: {{min_top1: 1.01}}}}
    require: checked
    reason: a gate nothing meets
verify:
  - {{artifact: q8_0, engine: llamacpp}}
""")
    return path


def test_gather_needs_a_store_and_a_plan_without_one_says_so(fixture_root, tmp_path):
    path = small_release(fixture_root, tmp_path)
    assert_one_line_error(run("release", path, "--gather"), 2, "--gather takes the stages from a store")
    result = run("release", path, "--plan")
    assert result.exit_code == 0 and "no store: each job finds the outputs it needs only in its own" in result.stderr
    assert "small.yaml --only q8_0\n" in result.stdout and "--store" not in result.stdout


def test_plan_lists_jobs_with_needs_resources_and_commands(fixture_root, tmp_path):
    path = small_release(fixture_root, tmp_path)
    text = path.read_text().replace("verify:\n", """  w4: {quantize: {recipe: gptq-w4a16}, require: checked, reason: plan only}
verify:
  - {artifact: merged, engine: vllm, tp: [2]}
""")
    path.write_text(text)
    result = run("release", path, "--plan", "--json", "--store", tmp_path / "store")
    assert result.exit_code == 0, result.stderr
    jobs = {j["id"]: j for j in json.loads(result.stdout)}
    assert list(jobs) == ["merged", "q8_0", "fp8", "w4", "verify-merged-vllm", "verify-q8_0-llamacpp"]
    assert jobs["q8_0"]["needs"] == ["merged"] and jobs["merged"]["needs"] == []
    # GPUs: one per rank of an engine that serves on them; none for llama.cpp's CPU server; GPTQ wants one, FP8 none
    gpus = {job_id: job["resources"]["gpus"] for job_id, job in jobs.items()}
    assert gpus == {"merged": 0, "q8_0": 0, "fp8": 0, "w4": 1, "verify-merged-vllm": 2, "verify-q8_0-llamacpp": 0}
    memory = {job_id: job["resources"]["memory_bytes"] for job_id, job in jobs.items()}
    assert all(m and m > 0 for m in memory.values()), memory  # each stage's own estimate, merge and gguf included
    assert memory["w4"] != memory["fp8"]  # llm-compressor's GPTQ on the offloaded model, the workbench's FP8 walk
    assert jobs["fp8"]["command"][-4:] == ["--only", "fp8", "--store", str(tmp_path / "store")]
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


def test_stage_keys_travel_between_folder_layouts(fixture_root, tmp_path):
    """The same release file, calibration text, base and adapter in two folders at different depths: the
    options name different absolute paths, the stage keys are the same (a store serves both layouts)."""
    from workbench.release.spec import load_release
    from workbench.release.state import Keys

    keys, options = [], []
    for layout in ("a", "b/deeper"):
        folder = tmp_path / layout
        (folder / "models").mkdir(parents=True)
        for name in ("llama", "llama-lora"):
            shutil.copytree(fixture_root / name, folder / "models" / name)
        (folder / "calibration.txt").write_text("def f(x):\n    return x + 1\n" * 200)
        (folder / "r.yaml").write_text("""
name: r
base: models/llama
adapter: models/llama-lora
artifacts:
  fp8: {from: source, quantize: {recipe: fp8-static, calibration: calibration.txt}, require: checked, reason: keys only}
  merged: {merge: {dtype: auto}}
verify:
  - {artifact: adapter, engine: vllm}
  - {artifact: merged, engine: vllm, extra_args: [--chat-template=""" + str(folder / "calibration.txt") + """]}
""")
        release = load_release(folder / "r.yaml")
        stages = [s for s in release.stages if s.id in ("fp8", "merged", "verify-adapter-vllm")]
        options.append([s.options for s in stages])
        keys.append([Keys(release).key(s) for s in stages])
    assert options[0] != options[1]  # the absolute paths differ
    assert keys[0] == keys[1] and None not in keys[0]


def test_gather_from_an_empty_store_builds_nothing_and_is_incomplete(fixture_root, tmp_path):
    path = small_release(fixture_root, tmp_path)
    result = release(path, "--gather", "--store", tmp_path / "store", "--json")
    assert result.returncode == 4, result.stderr
    index = json.loads(result.stdout)
    assert {s["id"]: s["action"] for s in index["stages"]} == {
        "merged": "incomplete", "q8_0": "blocked", "fp8": "blocked", "verify-q8_0-llamacpp": "blocked"}
    assert index["stages"][0]["error"] == "not in the store: no job has run it"
    assert not (tmp_path / "out" / "small-merged").exists()


def test_store_refuses_links_and_keys_that_are_not_keys(tmp_path):
    store = Store(tmp_path / "store")
    key = "a" * 64
    made = tmp_path / "made"
    made.mkdir()
    (made / "weights.bin").write_bytes(b"x")
    store.put(key, [made], {"action": "built"}, None, ("r", "s"))
    entry = tmp_path / "store" / key / "files" / "made" / "weights.bin"
    assert entry.stat().st_ino == (made / "weights.bin").stat().st_ino  # a hard link, not a second copy
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", tmp_path / "store" / key / "files" / "made" / "link")
    with pytest.raises(BadInput, match="is not a regular file or folder"):
        store.fetch(key, [tmp_path / "out" / "made"])
    assert not (tmp_path / "out" / "made").exists()
    with pytest.raises(BadInput, match="not a stage key"):
        store.result("../etc")
    assert store.pointer("r", "s") == {"key": key, "engine_version": None}


def _job(command: list[str], out: Path, release_file: Path) -> subprocess.Popen:
    """A plan's job, run on the copy of the release file at ``release_file`` (another folder layout)."""
    argv = [WORKBENCH, command[1], str(release_file), *command[3:], "--out", str(out), "-q"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.engine
def test_plan_jobs_in_separate_folders_then_gather_equal_the_one_machine_run(fixture_root, tmp_path, figures):
    path = small_release(fixture_root, tmp_path)
    t0 = time.monotonic()
    plain = release(path, "--out", tmp_path / "plain", "--json")
    plain_seconds = time.monotonic() - t0
    assert plain.returncode == 1, plain.stderr
    store = tmp_path / "store"
    jobs = json.loads(release(path, "--plan", "--json", "--store", store).stdout)
    # every other job runs on a copy of the release file, its calibration text and its models in another folder
    # layout (the release file names them by other absolute paths): the stage keys must still meet in the store
    other = tmp_path / "other" / "layout"
    for name in ("llama", "llama-lora"):
        shutil.copytree(fixture_root / name, other / "models" / name)
    shutil.copy2(path.with_name("calibration.txt"), other / "calibration.txt")
    other_layout = other / path.name
    other_layout.write_text(path.read_text().replace(str(fixture_root), str(other / "models")))
    files = {j["id"]: (path, other_layout)[i % 2] for i, j in enumerate(jobs)}
    codes, finished, t0 = {}, set(), time.monotonic()
    while len(finished) < len(jobs):  # every job whose needs are done starts at once, like a CI matrix wave
        wave = [j for j in jobs if j["id"] not in finished and set(j["needs"]) <= finished]
        running = {j["id"]: _job(j["command"], tmp_path / f"job-{j['id']}", files[j["id"]]) for j in wave}
        for job_id, proc in running.items():
            proc.wait(timeout=900)
            codes[job_id] = proc.returncode
        finished.update(running)
    assert codes == {"merged": 0, "q8_0": 0, "fp8": 1, "verify-q8_0-llamacpp": 0}
    gathered = release(path, "--gather", "--store", store, "--out", tmp_path / "gathered", "--json")
    fanout_seconds = time.monotonic() - t0
    a, b = json.loads(plain.stdout), json.loads(gathered.stdout)
    assert gathered.returncode == plain.returncode == 1 and a["exit_code"] == b["exit_code"] == 1
    for artifact_id, entry in a["artifacts"].items():
        other = b["artifacts"][artifact_id]
        assert (entry["state"], entry["state_reason"]) == (other["state"], other["state_reason"]), artifact_id
        assert [v["verdict"] for v in entry["verifications"]] == [v["verdict"] for v in other["verifications"]]
    assert {s["id"]: (s["status"], s.get("error")) for s in a["stages"]} == {s["id"]: (s["status"], s.get("error")) for s in b["stages"]}
    assert {s["id"]: s["action"] for s in b["stages"]} == {"merged": "fetched", "q8_0": "fetched", "fp8": "failed",
                                                           "verify-q8_0-llamacpp": "fetched"}
    assert artifact_hashes(tmp_path / "plain") == artifact_hashes(tmp_path / "gathered")
    parts = sorted((tmp_path / "gathered" / "small-GGUF" / "small-Q8_0").glob("*.gguf"))
    assert [p.name for p in parts] == ["small-Q8_0-00001-of-00002.gguf", "small-Q8_0-00002-of-00002.gguf"]
    assert (tmp_path / "gathered" / "reports" / "logs" / "fp8.log").read_text().count("FAILED: quality gates failed") == 1
    again = json.loads(release(path, "--gather", "--store", store, "--out", tmp_path / "gathered", "--json").stdout)
    assert {s["id"]: s["action"] for s in again["stages"]}["q8_0"] == "cached"
    figures["release plan jobs + gather"] = {"one machine s": round(plain_seconds, 1), "jobs + gather s": round(fanout_seconds, 1)}


def test_example_fanout_workflow_runs_the_plan_the_matrix_and_the_gather():
    workflow = yaml.safe_load(FANOUT_WORKFLOW.read_text())
    jobs = workflow["jobs"]
    plan = "\n".join(s.get("run", "") for s in jobs["plan"]["steps"])
    assert "--plan --json" in plan and "GITHUB_OUTPUT" in plan
    assert jobs["verify"]["needs"] == ["plan", "artifacts"]
    assert jobs["verify"]["strategy"]["matrix"]["stage"] == "${{ fromJSON(needs.plan.outputs.verify) }}"
    verify = "\n".join(s.get("run", "") for s in jobs["verify"]["steps"])
    assert '--only "${{ matrix.stage }}" --store store' in verify
    gather = "\n".join(s.get("run", "") for s in jobs["gather"]["steps"])
    assert "--gather --store store" in gather and jobs["gather"]["if"] == "always()"
    downloads = [s for s in jobs["gather"]["steps"] if s.get("uses", "").startswith("actions/download-artifact")]
    assert downloads and downloads[0]["with"]["merge-multiple"] is True
