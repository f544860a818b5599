"""Running `workbench release` as CI does (a subprocess) and reading what it wrote: shared by the release,
fan-out, fault and verify tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RELEASE_FILE = ROOT / "examples" / "fixture-release.yaml"
WORKBENCH = os.path.join(os.path.dirname(sys.executable), "workbench")


def release(*args, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([WORKBENCH, "release", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def release_json(*args, timeout: float = 1200) -> dict:
    result = release(*args, "--json", timeout=timeout)
    assert result.stdout, result.stderr
    return json.loads(result.stdout)


def artifact_hashes(root: Path) -> dict[str, str]:
    """sha256 of every artifact file as the manifests list them, model cards excluded (they hold
    verification figures of each run), keyed by path under the root."""
    hashes = {}
    for manifest in sorted(root.rglob("*workbench.json")):
        folder = manifest.parent
        for name, entry in json.loads(manifest.read_text())["files"].items():
            if name != "README.md":
                hashes[str((folder / name).relative_to(root))] = entry["sha256"]
    return hashes


def write_release(folder: Path, edit, name: str = "release.yaml") -> Path:
    """The example release file, changed by ``edit(data)``, written into ``folder``."""
    data = yaml.safe_load(RELEASE_FILE.read_text())
    edit(data)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def reduced(data: dict) -> None:
    """The example cut to what the Ray and SIGKILL tests need: the merge, FP8 (checked: built and gated, not
    served here) and the GGUF; the merge on vLLM at TP=1 and the GGUF on llama.cpp. Every stage kind, one
    engine start per engine."""
    data["artifacts"] = {k: v for k, v in data["artifacts"].items() if k in ("merged", "fp8", "q8_0")}
    data["artifacts"]["fp8"].update(require="checked", reason="served in the full example release")
    data["verify"] = [{"artifact": "merged", "engine": "vllm", "tp": [1], "extra_args": ["--enforce-eager"]},
                      {"artifact": "q8_0", "engine": "llamacpp"}]


def report_of(out: Path, stage_id: str) -> dict:
    """A release's verification report of one stage."""
    return json.loads((out / "reports" / stage_id / "report.json").read_text())
