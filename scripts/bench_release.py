"""Benchmark: `workbench release examples/fixture-release.yaml` vs. what a user would otherwise write: a shell
script calling the same verbs one by one (merge, two quantizations, GGUF, three verifications), each a new
process. Measured in one run: a fresh release, the script, a re-run of each (the release finds every stage
cached; the script redoes everything), and a release resumed after a SIGKILL during its verifications.

    .venv/bin/python scripts/bench_release.py [--json out/bench_release.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fixtures  # noqa: E402
from benchlib import measure, save  # noqa: E402

RELEASE_FILE = HERE.parent / "examples" / "fixture-release.yaml"
WORKBENCH = str(Path(sys.executable).with_name("workbench"))


def script_steps(fixture_root: Path, out: Path) -> list[list[str]]:
    """The release file's chain as separate commands (same options)."""
    merged, eager = out / "merged", "--extra-arg=--enforce-eager"
    return [
        ["merge", fixture_root / "llama", fixture_root / "llama-lora", "--out", merged, "--force", "-q"],
        ["quantize", merged, "--method", "fp8-static", "--samples", "32", "--seq-len", "128", "--out", out / "fp8", "--force", "-q"],
        ["quantize", merged, "--method", "w8a8-int8", "--samples", "32", "--seq-len", "128", "--out", out / "w8a8", "--force", "-q"],
        ["convert", "gguf", merged, "--outtype", "q8_0", "--out", out / "q8_0.gguf", "--force", "-q"],
        ["verify", merged, "--server", "vllm", "--tp", "1,2", eager, "--report", out / "v1", "-q"],
        ["verify", out / "w8a8", "--server", "vllm", "--tp", "1", eager, "--report", out / "v2", "-q"],
        ["verify", out / "q8_0.gguf", "--server", "llamacpp", "--report", out / "v3", "-q"],
    ]


def run_script(steps: list[list]) -> dict:
    t0, peak = time.perf_counter(), 0.0
    for step in steps:
        peak = max(peak, measure([WORKBENCH, *map(str, step)])["peak_rss_mib"])
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_mib": peak}


def killed_then_resumed(out: Path, after: float) -> dict:
    """SIGKILL the release ``after`` seconds in, then time the re-run that finishes it."""
    proc = subprocess.Popen([WORKBENCH, "release", str(RELEASE_FILE), "--out", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(12)  # the engine's guard takes its group down within its 10 s grace
    return measure([WORKBENCH, "release", str(RELEASE_FILE), "--out", str(out), "-q"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    fixture_root = fixtures.ensure_fixtures()
    os.environ["WORKBENCH_FIXTURES"] = str(fixture_root)
    work = Path(tempfile.mkdtemp(prefix="bench-release-"))
    try:
        release = [WORKBENCH, "release", str(RELEASE_FILE), "--out", str(work / "release"), "-q"]
        results = {
            "release": measure(release),
            "script": run_script(script_steps(fixture_root, work / "script")),
            "release_rerun": measure(release),
            "script_rerun": run_script(script_steps(fixture_root, work / "script")),
            "release_resumed_after_kill_at_30s": killed_then_resumed(work / "killed", 30.0),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["ratios"] = {
        "release / script": round(results["release"]["seconds"] / results["script"]["seconds"], 2),
        "release re-run / script re-run": round(results["release_rerun"]["seconds"] / results["script_rerun"]["seconds"], 3),
    }
    print("| run | wall s | peak RSS MiB |\n|---|---|---|")
    for name, r in results.items():
        if name != "ratios":
            print(f"| {name} | {r['seconds']} | {r['peak_rss_mib']} |")
    for name, ratio in results["ratios"].items():
        print(f"{name}: {ratio}x")
    save(args.json, results)


if __name__ == "__main__":
    main()
