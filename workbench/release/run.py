"""`workbench release`: run a release file's stages in dependency order, skipping each stage whose key
(sha256 of its inputs' content, its options and recipe, and the tool versions) matches the key recorded
with its finished output.

Why a stage's output can be trusted: every verb writes to a temporary path and renames it into place
only when complete, so an output at its final path is whole; the key is recorded inside it (the
artifact's workbench.json, or a verify report's stage.json written last), and its files' sizes are checked
against the manifest. Anything else is redone. A killed run therefore resumes where it stopped.
"""

from __future__ import annotations

import fnmatch
import gc
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import replace_file
from ..errors import INCOMPLETE, INTERNAL, BadInput, WorkbenchError, as_resource_error
from ..manifest import last_step, manifest_path, now
from ..safety import exclusive, remove_owned
from .kinds import KINDS
from .publish import publish
from .spec import SOURCE, UNMERGED, Release, Stage, check_contained
from .state import Keys, StageResult, outputs, recorded_key
from .store import Store

class Observer:
    """What the command line shows; every method may be left as is."""

    def stage_started(self, stage: Stage, number: int, total: int, reason: str) -> None:
        """A stage is settled next (``number`` of ``total`` selected); ``reason`` says whether and why it runs."""

    def event(self, message: str) -> None:
        """A running stage's step, as its verb reports it."""

    def progress(self, done: int, total: int) -> None:
        """A running stage's long step has done ``done`` of its ``total`` units (layers, tensors, samples)."""

    def stage_finished(self, result: "StageResult") -> None:
        """A stage is settled: built, cached, fetched, failed, incomplete or blocked."""


@dataclass
class Decision:
    """What a run does with one stage: whether it runs and why, its key (None while an input is not built), and
    the estimate the dry run shows."""
    stage: Stage
    run: bool
    reason: str
    key: str | None = None
    estimate: str | None = None  # the stage's estimated peak memory and time


def _foreign(release: Release, stage: Stage) -> bool:
    """An existing output this release did not make (no release record naming it)."""
    if KINDS[stage.kind].report or not stage.output.exists():
        return False
    last = last_step(stage.output)
    return (last.get("release") or {}).get("name") != release.name


# ---------------------------------------------------------------- planning

def select(release: Release, only: tuple[str, ...]) -> set[str]:
    """The stages --only names (glob patterns) plus the artifacts they read, transitively."""
    if not only:
        return {s.id for s in release.stages}
    chosen = {s.id for s in release.stages if any(fnmatch.fnmatchcase(s.id, p) for p in only)}
    unknown = [p for p in only if not any(fnmatch.fnmatchcase(s.id, p) for s in release.stages)]
    if unknown:
        raise BadInput(f"--only {unknown[0]!r} matches no stage (stages: {', '.join(s.id for s in release.stages)})")
    for stage in reversed(release.stages):
        if stage.id in chosen:
            chosen.update(n for n in stage.needs if n not in (SOURCE, UNMERGED))
    return chosen


def decide(release: Release, keys: Keys, stage: Stage, forced: bool, rebuilt: set[str]) -> Decision:
    """Whether ``stage`` runs, and why: after an input rebuilt in this run (``rebuilt``), when ``forced``, or when
    no finished output records its key or the last run failed; otherwise it is cached."""
    waiting = [n for n in stage.needs if n in rebuilt]
    if waiting:
        return Decision(stage, True, f"{'forced (--force)' if forced else 'decided'} after {', '.join(waiting)} is built")
    key = keys.key(stage)
    if forced:
        return Decision(stage, True, "forced (--force)", key)
    recorded, status = recorded_key(stage)
    if key is not None and recorded == key and status == "ok":
        return Decision(stage, False, f"cached (key {key[:12]})", key)
    if recorded is None:
        reason = "no finished output"
    elif recorded != key:
        reason = "inputs, options or tool versions changed"
    else:
        reason = "last run failed"
    return Decision(stage, True, reason, key)


def _forced(release: Release, only: tuple[str, ...], force: bool) -> set[str]:
    """--force redoes the stages --only names (all stages without --only), not the inputs they need."""
    if not force:
        return set()
    return {s.id for s in release.stages if not only or any(fnmatch.fnmatchcase(s.id, p) for p in only)}


def plan(release: Release, only: tuple[str, ...] = (), force: bool = False) -> list[Decision]:
    """What a run would do, stage by stage (the --dry-run view)."""
    keys, chosen, forced = Keys(release), select(release, only), _forced(release, only, force)
    rebuilt: set[str] = set()
    decisions = []
    for stage in release.stages:
        if stage.id not in chosen:
            continue
        d = decide(release, keys, stage, stage.id in forced, rebuilt)
        if d.run:
            rebuilt.add(stage.id)
            estimate = KINDS[stage.kind].estimate(release, stage)
            d.estimate = ("reference " if KINDS[stage.kind].report else "") + estimate.describe() if estimate else None
        decisions.append(d)
    return decisions


def stage_graph(release: Release) -> list[dict]:
    """The stages as jobs for another scheduler (a CI matrix, Ray): each with the artifacts it needs, the
    resources it asks for (GPUs: one per rank of an engine that serves on GPUs, one for a method that wants an
    accelerator; memory: the stage's estimate) and the command that runs it alone. With a store the jobs share
    their outputs through it, so each may run on its own machine once the jobs it needs have finished; without
    one each job's --out must already hold what it needs."""
    store = ["--store", str(release.store)] if release.store else []
    graph = []
    for stage in release.stages:
        estimate = KINDS[stage.kind].estimate(release, stage)
        graph.append({
            "id": stage.id, "kind": stage.kind, "needs": [n for n in stage.needs if n not in (SOURCE, UNMERGED)],
            "resources": {"cpus": 1, "gpus": KINDS[stage.kind].gpus(stage),
                          "memory_bytes": estimate.peak_bytes if estimate else None},
            "command": ["workbench", "release", str(release.file), "--only", stage.id, *store],
        })
    return graph


# ---------------------------------------------------------------- running

def run_release(release: Release, only: tuple[str, ...] = (), force: bool = False, observer: Observer | None = None,
                gather: bool = False, cluster: dict | None = None) -> dict:
    """Run the selected stages; returns the release index (also written to <output>/release.json). With a
    store, a stage another job finished is taken from it and a stage built here is put there. ``gather``
    builds nothing: every stage not finished here is taken from the store as its job left it. ``cluster``: how
    the jobs ran (release --ray), recorded in the index."""
    with exclusive(release.output, "release output"):
        check_contained(release)
        store = Store(release.store) if release.store else None
        if gather and store is None:
            raise BadInput(f"{release.file.name}: --gather takes the stages from a store: add `store: FOLDER` or pass --store")
        pinned = _recorded_engines(release, store) if gather else {}
        return _run_locked(release, Keys(release, pinned), only, force, observer or Observer(), store, gather, cluster)


def _recorded_engines(release: Release, store: Store) -> dict[str, str | None]:
    """The engine version each verify job recorded in the store (the gathering machine serves nothing)."""
    pointers = {s.id: store.pointer(release.name, s.id) for s in release.stages if KINDS[s.kind].report}
    return {stage_id: p.get("engine_version") for stage_id, p in pointers.items() if p}


def _run_locked(release: Release, keys: Keys, only: tuple[str, ...], force: bool, observer: Observer,
                store: Store | None, gather: bool, cluster: dict | None) -> dict:
    started = now()
    chosen, forced = select(release, only), _forced(release, only, force)
    for stage in release.stages:
        if stage.id in chosen and _foreign(release, stage) and stage.id not in forced:
            raise BadInput(f"output exists and was not made by release {release.name!r}: {stage.output} (use --force to replace it)")
    logs = release.output / "reports" / "logs"
    results: dict[str, StageResult] = {}
    selected = [s for s in release.stages if s.id in chosen]
    for number, stage in enumerate(selected, 1):
        failed_inputs = [n for n in stage.needs if n in results and results[n].action in ("failed", "incomplete", "blocked")]
        if failed_inputs:
            result = StageResult(stage.id, stage.kind, "blocked", str(stage.output), error=f"{failed_inputs[0]} failed")
        else:
            result = _settle(release, keys, stage, stage.id in forced, observer, logs, store, gather, (number, len(selected)))
        observer.stage_finished(result)
        results[stage.id] = result
        gc.collect()
    return publish(release, keys, results, started, partial=bool(only), cluster=cluster)


def _settle(release: Release, keys: Keys, stage: Stage, forced: bool, observer: Observer, logs: Path,
            store: Store | None, gather: bool, position: tuple[int, int]) -> StageResult:
    """One stage: cached here, taken from the store, built (and put in the store), or (gathering) missing."""
    try:
        d = decide(release, keys, stage, forced, set())
    except WorkbenchError as exc:
        return StageResult(stage.id, stage.kind, _action(exc.exit_code), str(stage.output), error=str(exc), exit_code=exc.exit_code)
    observer.stage_started(stage, *position, d.reason)
    if not d.run:
        if store is not None and (store.result(d.key) or {}).get("action") != "built":  # the store learns of it
            _put(release, store, stage, StageResult(stage.id, stage.kind, "built", str(stage.output), d.key), keys)
        return StageResult(stage.id, stage.kind, "cached", str(stage.output), d.key)
    if store is not None and d.key and not forced:
        taken = _take(store, stage, d.key, logs, gather)
        if taken is not None:
            return taken
    if gather:
        why = "its inputs are not all in the store" if d.key is None else "not in the store: no job has run it"
        return StageResult(stage.id, stage.kind, "incomplete", str(stage.output), d.key, error=why, exit_code=INCOMPLETE)
    result = _run_stage(release, stage, d.key, observer, logs, keys)
    if store is not None and d.key:
        _put(release, store, stage, result, keys)
    return result


def _put(release: Release, store: Store, stage: Stage, result: StageResult, keys: Keys) -> None:
    entry = {"action": result.action, "error": result.error, "exit_code": result.exit_code, "seconds": result.seconds,
             "engine_version": keys.engine_of(stage) if KINDS[stage.kind].report else None}
    store.put(result.key, outputs(stage), entry, Path(result.log) if result.log else None, (release.name, stage.id))


def _take(store: Store, stage: Stage, key: str, logs: Path, gather: bool) -> StageResult | None:
    """The stage as a job left it in the store: only a finished one, unless gathering (failures are reported
    then, and redone by a job)."""
    entry = store.result(key)
    if entry is None or (entry["action"] != "built" and not gather):
        return None
    log = logs / f"{stage.id}.log"
    fetched = store.fetch(key, outputs(stage), log)
    finished = entry["action"] == "built"
    if finished and (not fetched or recorded_key(stage)[0] != key):  # a damaged entry is not trusted
        return None
    action = "fetched" if finished else entry["action"]
    return StageResult(stage.id, stage.kind, action, str(stage.output), key, entry.get("seconds", 0.0), entry.get("error"),
                       entry.get("exit_code", 0), str(log) if log.is_file() else None)


def _run_stage(release: Release, stage: Stage, key: str, observer: Observer, logs: Path, keys: Keys) -> StageResult:
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{stage.id}.log"
    lines: list[str] = []

    def event(message: str) -> None:
        lines.append(f"{now()} {message}")
        observer.event(message)

    t0 = time.perf_counter()
    result = StageResult(stage.id, stage.kind, "built", str(stage.output), key)
    try:
        before = keys.sources_read(stage)
        KINDS[stage.kind].run(release, stage, key, event, observer.progress)
        _check_sources_unchanged(keys, stage, before)
    except WorkbenchError as exc:
        result.action, result.error, result.exit_code = _action(exc.exit_code), str(exc), exc.exit_code
    except Exception as exc:  # noqa: BLE001 - memory, or a bug of ours: recorded (with the traceback), the others go on
        oom = as_resource_error(exc, f"in stage {stage.id}")
        result.action, result.exit_code = "failed", oom.exit_code if oom else INTERNAL
        result.error = str(oom) if oom else f"internal error ({type(exc).__name__}: {exc}); traceback in {log_path}"
        lines.append(traceback.format_exc())
    result.seconds = round(time.perf_counter() - t0, 2)
    if result.error:
        lines.append(f"{now()} FAILED: {result.error}")
    replace_file(log_path, "\n".join(lines) + "\n")  # a new file: never through a link planted at its name
    result.log = str(log_path)
    return result


def _check_sources_unchanged(keys: Keys, stage: Stage, before: dict[str, str]) -> None:
    """A source folder that changed while the stage read it makes a mixed output: it is removed, never kept
    under a key that names either version."""
    after = keys.sources_read(stage)
    changed = [w for w in before if after[w] != before[w]]
    if not changed:
        return
    which = changed[0]
    if KINDS[stage.kind].report:
        remove_owned(stage.output, "report folder")
    elif stage.output.is_dir():
        shutil.rmtree(stage.output)  # made by this stage a moment ago
    else:
        for path in (manifest_path(stage.output), stage.output):
            path.unlink(missing_ok=True)
    raise BadInput(f"the {which} changed while stage {stage.id} ran (sha256 {before[which][:12]} -> {after[which][:12]}): "
                   "its output was removed; run the release again")


def _action(exit_code: int) -> str:
    return "incomplete" if exit_code == INCOMPLETE else "failed"
