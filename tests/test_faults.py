"""Faults while writing: a full disk, Ctrl-C and SIGKILL mid-write, two releases on one output folder, and a
source checkpoint that changes while a release reads it. Each ends with a non-zero exit that is not 5 (an
internal error), one line, no folder with the final name unless it is complete, the source byte-identical,
and a next run that succeeds without any cleaning up by hand."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import as_from_a_terminal, assert_one_line_error, run
from releases import WORKBENCH
from workbench.release.run import Observer, run_release
from workbench.release.spec import load_release
from workbench.safety import LOCK_NAME


def folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def wait_for(condition, proc: subprocess.Popen, what: str, limit: float = 300.0) -> None:
    """Poll until ``condition()`` holds; fail if the process ends first (the event never came)."""
    deadline = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended ({proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {limit} s")
        time.sleep(0.005)


# ---------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: room for the start of an output, not for all of it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("verb", ["merge", "convert", "quantize"])
def test_a_full_disk_is_a_missing_resource_with_the_figures(verb, small_disk, llama, llama_lora):
    source = folder_hash(llama)
    out = small_disk / "out"
    argv = {"merge": ("merge", llama, llama_lora, "--out", out, "-q"),
            "convert": ("convert", "gguf", llama, "--outtype", "f32", "--out", out / "m.gguf", "-q"),
            "quantize": ("quantize", llama, "--method", "fp8", "--samples", "4", "--out", out, "-q")}[verb]
    result = run(*argv)
    assert_one_line_error(result, 3, "no space left on device writing ")
    assert "MiB free of 3.0 MiB on that file system; nothing was kept" in result.stderr
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == []  # nothing half-written
    assert folder_hash(llama) == source
    subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    again = run(*argv)
    assert again.exit_code == 0, again.stderr


# ---------------------------------------------------------------- Ctrl-C and SIGKILL mid-write

@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A random Llama of 360 MB (hidden 1024, 8 layers, vocab 32000) and an r=16 adapter: large enough that
    a merge is still writing when the test sees its first bytes."""
    import make_synthetic

    root = tmp_path_factory.mktemp("wide")
    config = make_synthetic.llama_config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                         num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                         rope_theta=10000.0, max_position_embeddings=2048)
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    make_synthetic.write_base(base, config, shard_bytes=100 * 2**20)
    make_synthetic.write_adapter(adapter, base, config)
    return base, adapter


def merging(base: Path, adapter: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([WORKBENCH, "merge", base, adapter, "--out", out, "-q"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_from_a_terminal)
    partial = out.with_name(f".{out.name}.partial-{proc.pid}")
    wait_for(lambda: any(p.stat().st_size > 2**20 for p in partial.glob("*.safetensors")), proc, "the first shard's bytes")
    return proc


@pytest.mark.slow
def test_ctrl_c_mid_write_leaves_nothing_and_the_next_run_succeeds(wide_model, tmp_path):
    base, adapter = wide_model
    source = folder_hash(base)
    out = tmp_path / "merged"
    proc = merging(base, adapter, out)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr.strip() == "interrupted", (proc.returncode, stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no final folder, no partial
    assert folder_hash(base) == source
    assert run("merge", base, adapter, "--out", out, "-q").exit_code == 0


@pytest.mark.slow
def test_sigkill_mid_write_is_cleaned_up_by_the_next_run(wide_model, tmp_path):
    base, adapter = wide_model
    out = tmp_path / "merged"
    proc = merging(base, adapter, out)
    proc.kill()
    proc.wait(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f".merged.partial-{proc.pid}"]  # the killed run's partial; never the final name
    result = run("merge", base, adapter, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# ---------------------------------------------------------------- two releases on one output folder

def gguf_release(folder: Path, base: Path) -> Path:
    path = folder / "release.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "base": str(base), "output": "out", "artifacts": {
        "f16": {"gguf": "f16", "require": "checked", "reason": "no engine in this test"}}}))
    return path


@pytest.mark.slow
def test_a_second_release_on_the_same_output_is_refused_while_the_first_runs(tmp_path, llama):
    file = gguf_release(tmp_path, llama)
    lock = tmp_path / "out" / LOCK_NAME
    first = subprocess.Popen([WORKBENCH, "release", file, "-q"], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), first, "the first release's lock")
    first.send_signal(signal.SIGSTOP)  # it holds the lock, mid-run, for as long as the test needs
    try:
        assert_one_line_error(run("release", file), 3, f"is in use by another workbench run (pid {first.pid})")
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    second = run("release", file, "-q")
    assert second.exit_code == 0 and "cached" in second.stderr, second.stderr


# ---------------------------------------------------------------- the source changing under a release

class ChangeBase(Observer):
    """Rewrites a file of the base once: during the merge (at its first tensor), or after the first stage."""

    def __init__(self, base: Path, during: bool):
        self.base, self.during, self.done = base, during, False
        self.stage = None

    def stage_started(self, stage, number, total, reason):
        self.stage = stage.id

    def _change(self):
        if not self.done:
            self.done = True
            path = self.base / "generation_config.json"
            path.write_text(path.read_text().rstrip() + "\n\n")  # the same settings, other bytes

    def progress(self, done, total):
        if self.during and self.stage == "merged":
            self._change()

    def stage_finished(self, result):
        if not self.during:  # after the first stage, before the second
            self._change()


def merge_release(folder: Path, base: Path, adapter: Path) -> Path:
    path = folder / "release.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "base": str(base), "adapter": str(adapter), "output": "out", "artifacts": {
        "merged": {"merge": {}, "require": "checked", "reason": "no engine in this test"},
        "f16": {"from": "source", "gguf": "f16", "require": "checked", "reason": "no engine in this test"}}}))
    return path


def test_a_base_changed_during_a_stage_never_makes_a_mixed_artifact(tmp_path, llama, llama_lora, copy_of):
    base = copy_of(llama, "base")
    release = load_release(merge_release(tmp_path, base, llama_lora))
    index = run_release(release, observer=ChangeBase(base, during=True))
    merged = next(s for s in index["stages"] if s["id"] == "merged")
    assert merged["status"] == "failed" and index["exit_code"] == 2, merged
    assert "the base changed while stage merged ran" in merged["error"] and "its output was removed" in merged["error"]
    assert not (tmp_path / "out" / "r-merged").exists()
    again = run("release", tmp_path / "release.yaml", "-q")  # the changed base, read whole this time
    assert again.exit_code == 0, again.stderr


def test_a_base_changed_between_stages_reruns_what_read_it(tmp_path, llama, llama_lora, copy_of):
    base = copy_of(llama, "base")
    release = load_release(merge_release(tmp_path, base, llama_lora))
    index = run_release(release, observer=ChangeBase(base, during=False))
    assert index["passed"], index["stages"]
    first, second = (s["id"] for s in index["stages"])
    plan = {d["id"]: d for d in json.loads(run("release", tmp_path / "release.yaml", "--dry-run", "--json").stdout)}
    assert plan[first]["run"] and plan[first]["reason"] == "inputs, options or tool versions changed"
    assert not plan[second]["run"], plan  # it read the base as it is now
