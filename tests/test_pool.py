"""verify's server pool (workbench/verify/pool.py), with a stand-in engine: a tiny HTTP server that answers
every GET, used to test the pool's lifecycle only (never as proof that an artifact serves). The real engines
go through the same pool in every engine test (conftest.verify_cli)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from workbench.engines import ENGINES
from workbench.process import group_alive
from workbench.verify.launch import Server, engine_server
from workbench.verify.pool import ServerPool, current_pool

STAND_IN = textwrap.dedent("""\
    import http.server, sys
    port = int(sys.argv[sys.argv.index("--port") + 1])
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Ok).serve_forever()
""")


@pytest.fixture
def engine(tmp_path):
    """An executable used as the engine's interpreter: it answers the installed-check, then serves."""
    (tmp_path / "serve.py").write_text(STAND_IN)
    script = tmp_path / "engine.sh"
    script.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then exit 0; fi\nexec {sys.executable} {tmp_path / "serve.py"} "$@"\n')
    script.chmod(0o755)
    return str(script)


def server(engine, tmp_path, model="m", **options) -> Server:
    return engine_server(ENGINES["vllm"], tmp_path / model, python=engine, log_path=tmp_path / f"{model}.log", gpu=False, cpus=[0],
                  ready_timeout=30, **options)


def states(server: Server) -> set[str]:
    """The run states of the engine's processes, its guard left out."""
    out = subprocess.run(["ps", "-o", "pid=,stat=", "-s", str(server.proc.pid)], capture_output=True, text=True).stdout
    return {stat[0] for pid, stat in (line.split() for line in out.splitlines()) if int(pid) != server.proc.pid}


def test_an_identical_server_is_handed_back_paused_between_runs_and_stopped_at_the_end(engine, tmp_path):
    with ServerPool(keep=2, log_dir=tmp_path / "logs") as pool:
        (tmp_path / "logs").mkdir()
        with pool.serve(server(engine, tmp_path)) as first:
            assert not first.reused and states(first) == {"S"} and first.log_path.parent == tmp_path / "logs"
            group = first.proc.pid
        assert states(first) == {"T"}  # paused: no CPU while it waits
        with pool.serve(server(engine, tmp_path)) as again:
            assert again is first and again.reused and states(again) <= {"S", "R"}
            assert again.get("/v1/models") == {}
        with pool.serve(server(engine, tmp_path, extra_args=("--enforce-eager",))) as other:
            assert other is not first and not other.reused  # another command is another engine
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model.safetensors").write_bytes(b"new bytes")
        with pool.serve(server(engine, tmp_path)) as rewritten:
            assert rewritten is not first and not rewritten.reused  # the files changed: the kept engine is not theirs
        assert (pool.started, pool.reused, len(pool.idle)) == (3, 1, 2) and first not in pool.idle.values()
    assert not group_alive(group) and not pool.idle


def test_the_least_recently_used_goes_before_a_new_one_starts(engine, tmp_path):
    with ServerPool(keep=1) as pool:
        with pool.serve(server(engine, tmp_path, "a")) as a:
            group = a.proc.pid
        with pool.serve(server(engine, tmp_path, "b")) as b:
            assert not group_alive(group)  # stopped before b started: one engine at a time
        assert list(pool.idle.values()) == [b]


def test_a_run_that_raises_stops_its_server_and_an_idle_pool_keeps_none(engine, tmp_path):
    with ServerPool(keep=2) as pool:
        with pytest.raises(KeyboardInterrupt):
            with pool.serve(server(engine, tmp_path)) as live:
                group = live.proc.pid
                raise KeyboardInterrupt
        assert not group_alive(group) and not pool.idle
    outside = current_pool()
    assert outside.keep == 0
    with outside.serve(server(engine, tmp_path)) as live:
        group = live.proc.pid
    assert not group_alive(group)  # outside a session every run stops its own server


def test_a_paused_engine_still_dies_with_the_workbench(engine, tmp_path):
    """SIGKILL of the process that owns the pool: the guard stays awake and takes the paused engine down."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from workbench.engines import ENGINES
        from workbench.verify.launch import engine_server
        from workbench.verify.pool import ServerPool
        pool = ServerPool(keep=1)
        with pool.serve(engine_server(ENGINES["vllm"], Path("m"), python={engine!r}, log_path=Path({str(tmp_path / "k.log")!r}),
                               gpu=False, cpus=[0], ready_timeout=30)) as live:
            pass
        print(live.proc.pid, flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    group = int(proc.stdout.readline())
    assert group_alive(group)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30  # the guard's grace period is 10 s
    while group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(group)


def test_a_start_that_loses_its_port_to_another_process_is_redone_on_a_new_one(engine, tmp_path, monkeypatch):
    """Another job took the port between its choice and the engine's bind (two test workers, a CI runner's
    neighbours): that start-up is redone on a new port, its log kept beside, instead of failing the artifact."""
    import socket

    from workbench.verify import launch

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    s = server(engine, tmp_path)
    s.command.port = taken.getsockname()[1]
    monkeypatch.setattr(launch, "port_in_use", lambda port: False)  # the race: free when checked, taken at the bind
    try:
        s.start()
        assert s.port_clashes == 1 and s.command.port != taken.getsockname()[1]
        assert "address already in use" in (tmp_path / "m-port-clash-1.log").read_text().lower()
    finally:
        s.stop()
        taken.close()
