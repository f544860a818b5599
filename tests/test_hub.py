"""Hub ids (org/name[@revision]) wherever a model or adapter is named, read from a cache laid out as
huggingface_hub writes it (no hub is reachable here): the commit goes into manifests, stage keys and cards."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from conftest import run
from releases import release_json

from workbench.hub import hub_origin, parse_hub_id


def cache_repo(cache: Path, repo_id: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """``folder``'s files as huggingface_hub caches a snapshot: blobs/<sha256>, snapshots/<commit>/<name> a
    relative link to its blob, refs/<name> holding the commit. Returns the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1("".join(f"{p.name}{p.stat().st_size}" for p in files).encode() + repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for p in files:
        blob = hashlib.sha256(p.read_bytes()).hexdigest()
        os.link(p, repo / "blobs" / blob) if not (repo / "blobs" / blob).exists() else None
        (snapshot / p.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def hub(tmp_path, llama, llama_lora, monkeypatch):
    """An offline hub cache holding the fixture base (refs main and v1) and its adapter; the working folder
    is an empty one. Returns {repo id: commit}."""
    cache = tmp_path / "hub-cache"
    commits = {"org/tiny-llama": cache_repo(cache, "org/tiny-llama", llama, ("main", "v1")),
               "org/tiny-llama-lora": cache_repo(cache, "org/tiny-llama-lora", llama_lora)}
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)  # for the release's own process
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # for this one, whose huggingface_hub read them at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return commits


def test_hub_ids_are_told_from_paths():
    assert parse_hub_id("org/name") == ("org/name", "main")
    assert parse_hub_id("meta-llama/Llama-3.1-8B@v1.0") == ("meta-llama/Llama-3.1-8B", "v1.0")
    assert [parse_hub_id(p) for p in ("/abs/path", "./org/name", "name", "a/b/c", "~/x")] == [None] * 5
    snapshot = Path("/c/models--org--name/snapshots") / ("a" * 40)
    assert hub_origin(snapshot) == {"repo_id": "org/name", "commit": "a" * 40} and hub_origin(snapshot.parent) is None


def test_a_hub_id_quantizes_from_the_cache_into_the_working_folder(hub, tmp_path):
    """By branch, tag and commit: the same snapshot; the output is named after the repository, here, and its
    manifest names the repository and commit it was made from."""
    commit = hub["org/tiny-llama"]
    outputs = {"": "tiny-llama-fp8-static", "@v1": "v1", f"@{commit}": "by-commit"}  # the first by default
    for revision, out in outputs.items():
        named = () if revision == "" else ("--out", out)
        result = run("quantize", f"org/tiny-llama{revision}", "--method", "fp8", "--samples", "4", "--seq-len", "32",
                     *named, "--max-ppl-delta", "1e9", "--max-kl", "1e9", "--min-top1", "0", "-q")
        assert result.exit_code == 0, result.output
        step = json.loads((Path.cwd() / out / "workbench.json").read_text())["steps"][-1]
        assert step["inputs"]["model"]["hub"] == {"repo_id": "org/tiny-llama", "commit": commit}
    assert not list((tmp_path / "hub-cache").rglob("*fp8*"))  # nothing written into the cache


def test_a_revision_not_in_the_cache_offline_is_exit_3_naming_what_to_fetch(hub):
    result = run("merge", "org/tiny-llama@v9", "org/tiny-llama-lora")
    assert result.exit_code == 3
    assert "hf download org/tiny-llama --revision v9" in result.output and "\n" not in result.output.strip()
    assert not list(Path.cwd().iterdir())


def test_a_release_of_hub_ids_records_the_commits_in_every_manifest_key_and_card(hub, tmp_path):
    release = {"name": "rel", "base": "org/tiny-llama@v1", "adapter": "org/tiny-llama-lora", "output": "out",
               "artifacts": {"merged": {"merge": {"dtype": "auto"}, "require": "checked", "reason": "no engine here"},
                             "q8_0": {"from": "merged", "gguf": "q8_0", "require": "checked", "reason": "no engine here"}}}
    file = tmp_path / "release.yaml"
    file.write_text(yaml.safe_dump(release))
    index = release_json(file)
    out = tmp_path / "out"
    merged = json.loads((out / "rel-merged" / "workbench.json").read_text())
    gguf = json.loads((out / "rel-GGUF" / "rel-Q8_0.gguf.workbench.json").read_text())
    for manifest in (merged, gguf):
        inputs = manifest["steps"][0]["inputs"]
        assert inputs["base"]["hub"] == {"repo_id": "org/tiny-llama", "commit": hub["org/tiny-llama"]}
        assert inputs["adapter"]["hub"] == {"repo_id": "org/tiny-llama-lora", "commit": hub["org/tiny-llama-lora"]}
    assert "base_model: org/tiny-llama\n" in (out / "rel-merged" / "README.md").read_text()
    assert index["passed"] and index["exit_code"] == 0, index
