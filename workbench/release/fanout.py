"""`workbench release FILE --ray ADDRESS`: the release's stages as Ray tasks over a cluster.

Each stage of the plan (run.stage_graph) is one task, submitted with the tasks of the stages it needs as
arguments, so Ray starts it once they are done, on any node with the resources it asks for. A task runs the
stage's own `--only` command in a private working folder on its node; the stage's output reaches the other
nodes through the store (store.py), by the same keys a one-machine run uses. When every task has ended, the
release is gathered here from the store: release.json, the reports and the cards are the one-machine run's.

Ray is an optional dependency (`pip install workbench[ray]`); every node runs the same workbench and Python.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import BadInput, EnvironmentProblem
from ..safety import remote_code_trusted
from .run import Observer, run_release, stage_graph
from .spec import Release

LOCAL = "local"  # --ray local:N starts N nodes on this machine; auto is local:1


def run_on_ray(release: Release, address: str, observer: Observer) -> dict:
    """Run ``release`` with each stage as a Ray task on the cluster at ``address`` (``auto`` or ``local:N``: one
    or N nodes started on this machine, and <output>/store as the store when the release names none), then gather
    the release from the store here; returns the release index."""
    ray = _import_ray()
    nodes = _local_nodes(address)
    if release.store is None:
        if nodes is None:
            raise BadInput(f"{release.file.name}: a release over a cluster needs a store every node reads: add `store: FOLDER` "
                           "or pass --store")
        release.store = release.output / "store"
    graph = stage_graph(release)
    with _cluster(nodes, address) as (cluster_address, sessions):
        ray.init(address=cluster_address, logging_level="ERROR", log_to_driver=False)
        try:
            jobs = _run_jobs(ray, graph, observer)
            info = {"ray": ray.__version__, "address": "local" if sessions else cluster_address,
                    "nodes": sum(n["Alive"] for n in ray.nodes()), "local_node_sessions": sessions, "jobs": jobs}
        finally:
            ray.shutdown()
    return run_release(release, observer=observer, gather=True, cluster=info)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EnvironmentProblem("--ray needs Ray: pip install 'workbench[ray]'") from None
    return ray


def _local_nodes(address: str) -> int | None:
    """How many local nodes ``address`` asks for (auto: one), or None for a running cluster's address."""
    if address == "auto":
        return 1
    if address.startswith(f"{LOCAL}:"):
        count = address.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise BadInput(f"--ray {address}: local:N needs a positive number of nodes")
        return int(count)
    return None


@contextlib.contextmanager
def _cluster(nodes: int | None, address: str):
    """(address, the session id of each node started here): a local cluster of ``nodes`` nodes, or the given one."""
    if nodes is None:
        yield address, []
        return
    from ..engines import usable_cpus
    from ..raycluster import LocalRayCluster

    cpus = max(1, len(usable_cpus()) // nodes)
    with LocalRayCluster(sys.executable, nodes, cpus) as cluster:
        yield cluster.address, cluster.sessions


def _run_jobs(ray, graph: list[dict], observer: Observer) -> list[dict]:
    """Submit every stage as a task after the tasks it needs; wait for all; one record per job."""
    gpus = ray.cluster_resources().get("GPU", 0)
    largest = max(n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"])
    env = {k: v for k, v in os.environ.items() if k.startswith("WORKBENCH_")}
    task = ray.remote(_job)
    refs = {}
    for job in graph:
        memory = job["resources"]["memory_bytes"] or 0
        if memory > largest:
            raise BadInput(f"stage {job['id']} needs ~{memory / 2**30:.1f} GiB; the largest Ray node offers {largest / 2**30:.1f} GiB")
        options = {"num_cpus": job["resources"]["cpus"], "num_gpus": job["resources"]["gpus"] if gpus else 0,
                   "memory": memory or None, "max_retries": 0, "name": job["id"]}
        refs[job["id"]] = task.options(**options).remote(job, env, remote_code_trusted(), *[refs[n] for n in job["needs"]])
    records, pending = [], list(refs.values())
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            record = ray.get(done[0])
            records.append(record)
            observer.event(f"job {record['id']}: " + (f"skipped ({record['skipped']})" if record.get("skipped") else
                                                       f"exit {record['exit_code']} on node {record['node']} in {record['seconds']} s"))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return sorted(records, key=lambda r: [j["id"] for j in graph].index(r["id"]))


def _job(job: dict, env: dict[str, str], trust_remote_code: bool, *needs: dict) -> dict:
    """On a Ray node: the stage's `--only` command in a private folder (its output goes to the store)."""
    import ray

    failed = [n["id"] for n in needs if n.get("skipped") or n["exit_code"] != 0]
    if failed:  # the gather reports this stage blocked by the failed one
        return {"id": job["id"], "skipped": f"{failed[0]} did not pass", "exit_code": None}
    work = tempfile.mkdtemp(prefix=f"wb-job-{job['id']}-")
    argv = [sys.executable, "-m", "workbench", *job["command"][1:], "--out", str(Path(work) / "out"), "-q"]
    t0 = time.monotonic()
    try:
        done = subprocess.run(argv + (["--trust-remote-code"] if trust_remote_code else []), env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"id": job["id"], "exit_code": done.returncode, "seconds": round(time.monotonic() - t0, 1),
            "node": ray.get_runtime_context().get_node_id()[:12], "tail": done.stderr.strip().splitlines()[-3:]}
