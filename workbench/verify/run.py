"""`workbench verify`: start the real engine on an artifact under each TP size, probe it through the
OpenAI API, compare it with a reference model, always tear it down, and write CI reports."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import __version__
from ..checkpoint import Checkpoint
from ..errors import BadInput, EnvironmentProblem
from ..manifest import now, read_manifest
from .launch import EngineFailed, Server, port_in_use
from .preflight import preflight, quant_of
from .probes import Check, Client, Reference, run_probes
from .report import write_reports
from .servers import ENGINES, EngineSpec, check_installed, engine_python, engine_version

# quantization method -> artifact kind (which tolerances apply)
KIND_BY_METHOD = {
    "fp8": "fp8", "compressed-tensors-fp8": "fp8", "gptq": "int4", "awq": "int4",
    "compressed-tensors-wna16": "int4", "compressed-tensors": "int8",
}


def artifact_kind(artifact: Path, spec: EngineSpec, config: dict | None) -> str:
    if spec.artifact == "gguf":
        name = artifact.name.lower()
        return "gguf-full" if any(t in name for t in ("f32", "f16", "bf16")) else "gguf-8bit" if "q8_0" in name else "gguf-lowbit"
    method = quant_of(config or {}).method
    return "full" if method is None else KIND_BY_METHOD.get(method, "int8")


def default_reference(artifact: Path, kind: str) -> Path | None:
    """The model to compare with: a full-precision HF artifact is its own reference (engine vs.
    transformers on the same weights); otherwise the source recorded in the artifact's manifest."""
    if kind == "full":
        return artifact
    steps = (read_manifest(artifact) or {}).get("steps", [])
    source = (steps[-1].get("inputs", {}).get("model") or {}).get("path") if steps else None
    return Path(source) if source and Path(source, "config.json").exists() else None


def verify(
    artifact: Path,
    engine: str,
    tps: list[int],
    python: str | None = None,
    reference: Path | None = None,
    report_dir: Path | None = None,
    ready_timeout: float = 600.0,
    max_model_len: int | None = None,
    extra_args: tuple[str, ...] = (),
    force: bool = False,
    port: int | None = None,
    marlin: bool = True,
    preflight_only: bool = False,
    dtype: str | None = None,
    on_event=lambda message: None,
    gates: dict | None = None,
) -> dict:
    """Verify ``artifact`` on ``engine`` at each TP size; returns the report (also written to disk).
    ``dtype`` is passed to the engine and used for the reference too (default: the checkpoint's).
    ``gates`` overrides the reference comparison's limits (min_token_agreement, max_logprob_delta)."""
    spec = ENGINES[engine]
    artifact = Path(artifact).absolute()
    config = _check_artifact(artifact, spec)
    kind = artifact_kind(artifact, spec, config)
    table = _preflight(spec, config, tps, marlin)
    if dtype is not None and spec.dtype_flag is None:
        raise BadInput(f"{engine} serves a GGUF's own types; --dtype does not apply")
    report = {
        "workbench": __version__, "started": now(), "artifact": str(artifact), "engine": engine, "kind": kind, "dtype": dtype,
        "tp": tps, "preflight": {str(tp): reasons for tp, reasons in table.items()}, "runs": [],
    }
    report_dir = Path(report_dir or artifact.parent / f"{artifact.name}-verify" / engine).absolute()
    if preflight_only:
        report["passed"] = not any(table.values())
        report["reports"] = {k: str(v) for k, v in write_reports(report_dir, report).items()}
        return report

    ensure_gpu_engine(spec)
    python = engine_python(spec, python)
    check_installed(spec, python)
    report["engine_version"] = engine_version(spec, python)
    report["gates"] = gates or {}
    if port is not None and port_in_use(port):
        raise BadInput(f"port {port} on 127.0.0.1 is already in use")
    reference = Path(reference) if reference else default_reference(artifact, kind)
    if reference is not None and not (reference / "config.json").exists():
        raise BadInput(f"reference model not found: {reference}")
    report["reference"] = str(reference) if reference else None
    shutil.rmtree(report_dir / "logs", ignore_errors=True)

    with ThreadPoolExecutor(1) as pool:
        # the reference runs in transformers while the engine starts
        # llama.cpp computes in float32 whatever the GGUF's weight type; vLLM/SGLang in the served dtype
        ref_dtype = "float32" if spec.artifact == "gguf" else dtype or "auto"
        pending_reference = pool.submit(Reference, reference, ref_dtype) if reference else None
        for tp in tps:
            if table[tp] and not force:
                report["runs"].append({"tp": tp, "checks": [Check("preflight", "failed", "; ".join(table[tp])).as_dict()]})
                on_event(f"tp={tp}: refused by preflight: {'; '.join(table[tp])}")
                continue
            report["runs"].append(_serve_and_probe(spec, artifact, tp, python, port, max_model_len, dtype, extra_args,
                                                   report_dir, ready_timeout, pending_reference, kind, on_event, gates))
    report["passed"] = all(c["status"] != "failed" for run in report["runs"] for c in run["checks"])
    report["finished"] = now()
    report["reports"] = {k: str(v) for k, v in write_reports(report_dir, report).items()}
    return report


def _serve_and_probe(spec, artifact, tp, python, port, max_model_len, dtype, extra_args, report_dir, ready_timeout,
                     pending_reference, kind, on_event, gates) -> dict:
    log = report_dir / "logs" / f"{spec.name}-tp{tp}.log"
    server = Server(spec, artifact, tp=tp, python=python, port=port, max_model_len=max_model_len, dtype=dtype,
                    extra_args=extra_args, log_path=log, ready_timeout=ready_timeout)
    # the engine settings a user needs to reproduce this run (CPU vLLM's per-rank core binding at TP > 1)
    settings = dict(spec.tp_env) if tp > 1 else {}
    run = {"tp": tp, "argv": server.argv(), "env": settings, "log": str(log), "checks": []}
    on_event(f"tp={tp}: starting {spec.name} (log {log})")
    t0 = time.perf_counter()
    try:
        with server:
            run["startup_seconds"] = server.startup_seconds
            on_event(f"tp={tp}: ready in {server.startup_seconds}s, probing")
            startup = Check("startup", "passed", f"ready in {server.startup_seconds}s", seconds=server.startup_seconds)
            ref = pending_reference.result() if pending_reference else None
            client = Client(server.url, str(artifact), spec.request_extra)
            run["checks"] = [startup.as_dict()] + [c.as_dict() for c in run_probes(client, ref, kind, gates)]
    except EngineFailed as exc:
        run["checks"] = [Check("startup", "failed", str(exc), seconds=round(time.perf_counter() - t0, 1)).as_dict()]
    run["seconds"] = round(time.perf_counter() - t0, 1)
    return run


def _check_artifact(artifact: Path, spec: EngineSpec) -> dict | None:
    if spec.artifact == "gguf":
        if not artifact.is_file() or artifact.suffix != ".gguf":
            raise BadInput(f"{spec.name} serves a .gguf file; not found or not .gguf: {artifact}")
        with open(artifact, "rb") as f:
            if f.read(4) != b"GGUF":
                raise BadInput(f"not a GGUF file: {artifact}")
        return None
    if artifact.is_file():
        raise BadInput(f"{spec.name} serves a model folder, not a file: {artifact}")
    return Checkpoint(artifact).config


def _preflight(spec: EngineSpec, config: dict | None, tps: list[int], marlin: bool) -> dict[int, list[str]]:
    if any(tp < 1 for tp in tps):
        raise BadInput(f"TP sizes must be positive: {tps}")
    if spec.tp_flag is None:
        return {tp: [] if tp == 1 else [f"{spec.name} has no tensor parallelism"] for tp in tps}
    try:
        return preflight(config, tps, marlin)
    except (KeyError, ValueError, TypeError) as exc:
        raise BadInput(f"config.json lacks what the TP preflight needs: {exc}") from None


def ensure_gpu_engine(spec: EngineSpec) -> None:
    if spec.needs_gpu and shutil.which("nvidia-smi") is None:
        raise EnvironmentProblem(f"{spec.name} needs a CUDA GPU and none is visible (no nvidia-smi)")
