"""Benchmark: `workbench verify` (all probes + reference comparison, one server) vs. what a user would do
by hand: start the same engine with the same flags, wait for /v1/models, send one completion with curl,
stop it. Both on the merged fixture, vLLM (CPU) at TP=1, in one run; both include tearing the server down.

    .venv/bin/python scripts/bench_verify.py [--extra-arg=--enforce-eager] [--json out/bench_verify.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import fixtures  # noqa: E402
from benchlib import save  # noqa: E402

from workbench.process import free_port  # noqa: E402
from workbench.engines import ENGINES, engine_python  # noqa: E402


def bare_engine(model: Path, extra: list[str], log: Path) -> float:
    spec = ENGINES["vllm"]
    port = free_port()
    argv = [engine_python(spec), "-m", spec.module, "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *extra]
    env = {**os.environ, **spec.env, "VLLM_RPC_BASE_PATH": tempfile.mkdtemp()}
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"bare engine exited {proc.returncode}; see {log}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"model": str(model), "prompt": "def main(", "max_tokens": 24, "temperature": 0})
        subprocess.run(["curl", "-s", "-H", "Content-Type: application/json", "-d", body,
                        f"http://127.0.0.1:{port}/v1/completions"], check=True, capture_output=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extra-arg", action="append", default=[], help="engine flag for both runs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = fixtures.ensure_fixtures()
    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    model = work / "llama-lora-merged"
    workbench = str(Path(sys.executable).parent / "workbench")
    subprocess.run([workbench, "merge", str(root / "llama"), str(root / "llama-lora"), "--out", str(model), "-q"], check=True)

    bare = bare_engine(model, args.extra_arg, work / "bare.log")
    print(f"bare engine start + 1 curl + stop: {bare:.1f}s", flush=True)
    t0 = time.perf_counter()
    subprocess.run([workbench, "verify", str(model), "--server", "vllm", "--tp", "1", "--report", str(work / "report"), "-q",
                    *[f"--extra-arg={a}" for a in args.extra_arg]], check=True)
    verify = time.perf_counter() - t0
    report = json.loads((work / "report" / "report.json").read_text())
    probes = len(report["runs"][0]["checks"])
    print(f"workbench verify ({probes} checks incl. reference comparison): {verify:.1f}s")
    summary = {"bare_seconds": round(bare, 1), "verify_seconds": round(verify, 1), "ratio": round(verify / bare, 3),
               "engine_flags": args.extra_arg, "startup_seconds": report["runs"][0].get("startup_seconds")}
    print(f"ratio verify/bare {summary['ratio']:.2f}x (target <= 1.1)")
    save(args.json, summary)


if __name__ == "__main__":
    main()
