"""`verify --nodes 2` run for real on this machine: SGLang at TP=2 over two local nodes (a process each, one
core binding for both, a port each), vLLM at TP=2 over two local nodes with its own multiprocessing executor
(`vllm serve`, node 1 headless, each bound to its own core; vLLM's Ray executor, for GPU clusters, refuses a CPU).
The commands for real hosts pass the engines' own parsers. Every process the nodes started is gone afterwards
(checked by the process groups their guards recorded, and their sessions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import run
from workbench.engines import ENGINES, Layout, engine_python, multinode_commands, multinode_of
from workbench.process import group_alive, session_alive


def _verify_on_nodes(merged, engine: str, tmp_path, monkeypatch):
    record = tmp_path / "groups.txt"
    monkeypatch.setenv("WORKBENCH_GUARD_RECORD", str(record))  # each guard appends its group (= its session)
    t0 = time.monotonic()
    result = run("verify", merged, "--server", engine, "--tp", "2", "--nodes", "2", "--report", tmp_path / "r", "--json",
                 "--extra-arg=--enforce-eager" if engine == "vllm" else "--max-tokens=24")
    seconds = time.monotonic() - t0
    groups = [int(x) for x in record.read_text().split()] if record.exists() else []
    assert not _left(groups), "a node outlived the verification"
    return result, groups, seconds


def _left(groups: list[int], wait: float = 30) -> list[int]:
    """The guards' groups (each also its session) that still have a process after up to ``wait`` seconds (the
    guards' grace is 10 s)."""
    deadline = time.monotonic() + wait
    while (left := [g for g in groups if group_alive(g) or session_alive(g)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.mark.slow
@pytest.mark.engine
def test_sglang_tp2_across_two_local_nodes(merged, tmp_path, monkeypatch, figures):
    result, groups, seconds = _verify_on_nodes(merged, "sglang", tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads(result.stdout)
    assert report["nodes"] == 2 and len(groups) == 2  # node 0 (the API) and node 1, each under its guard
    run_ = report["runs"][0]
    checks = {c["name"]: c for c in run_["checks"]}
    assert all(c["status"] in ("passed", "skipped") for c in checks.values()), checks
    agreement = checks["reference"]["metrics"]["token_agreement"]
    assert agreement >= 0.95
    assert "--nnodes 2 --node-rank 1" in "\n".join(report["multinode_commands"]["2"])
    node1 = (tmp_path / "r" / "logs" / "sglang-tp2-node1.log").read_text()
    assert "--node-rank" not in node1 and node1  # node 1 ran and logged on its own
    figures["sglang tp=2 over 2 local nodes"] = {"ready s": run_["startup_seconds"], "agreement": agreement,
                                                 "verify s": round(seconds, 1)}


VLLM_PARSE = """
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser
for argv in json.loads(sys.argv[1]):
    try:
        a = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        print("PARSED 0", a.tensor_parallel_size, a.pipeline_parallel_size, a.distributed_executor_backend, flush=True)
    except SystemExit as exc:
        print("PARSED", exc.code, flush=True)
"""


@pytest.mark.slow
@pytest.mark.engine
def test_vllm_tp2_across_two_local_nodes_without_ray(merged, tmp_path, monkeypatch, figures):
    result, groups, seconds = _verify_on_nodes(merged, "vllm", tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output[-3000:]
    report = json.loads(result.stdout)
    assert report["nodes"] == 2 and report["nodes_ray"] is None and len(groups) == 2  # node 0 and node 1, guarded
    run_ = report["runs"][0]
    checks = {c["name"]: c for c in run_["checks"]}
    assert all(c["status"] == "passed" for c in checks.values()), checks
    agreement = checks["reference"]["metrics"]["token_agreement"]
    assert agreement >= 0.95
    node1 = (tmp_path / "r" / "logs" / "vllm-tp2-node1.log").read_text()
    assert "headless multiproc executor" in node1 and "world_size=2 rank=1" in node1  # a rank of the one model
    assert "--headless" in report["multinode_commands"]["2"][1]
    # GPU clusters keep vLLM's Ray executor: its command for real hosts passes vLLM's own parser
    commands = multinode_commands(ENGINES["vllm"], multinode_of(ENGINES["vllm"], True), str(merged), Layout(2, 2), 2)
    serve = commands[-1].splitlines()[1].split()  # vllm serve MODEL FLAGS...
    argvs = [["--model", serve[2], *serve[3:]], ["--model", serve[2], "--pipeline-parallel-sise", "2"]]
    done = subprocess.run([engine_python(ENGINES["vllm"]), "-c", VLLM_PARSE, json.dumps(argvs)], capture_output=True,
                          text=True, timeout=600)
    parsed = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("PARSED ")]
    assert parsed[0] == ["0", "2", "2", "ray"], done.stderr[-1500:]
    assert parsed[1] == ["2"] and "--pipeline-parallel-sise" in done.stderr  # the parser does refuse
    figures["vllm tp=2 over 2 local nodes"] = {"ready s": run_["startup_seconds"], "agreement": agreement,
                                              "verify s": round(seconds, 1)}


@pytest.mark.slow
@pytest.mark.engine
def test_sigkill_of_the_workbench_takes_every_node_down(merged, tmp_path):
    """SIGKILLed while both nodes start: each guard takes its group and session down."""
    record = tmp_path / "groups.txt"
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "verify", str(merged), "--server", "vllm", "--tp", "2",
                             "--nodes", "2", "--report", str(tmp_path / "r"), "--extra-arg=--enforce-eager"],
                            env={**os.environ, "WORKBENCH_GUARD_RECORD": str(record)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not record.exists() or len(record.read_text().split()) < 2):
        time.sleep(0.5)
    groups = [int(x) for x in record.read_text().split()]
    assert len(groups) == 2  # node 0 (the API) and node 1
    proc.kill()
    proc.wait()
    assert not _left(groups)
