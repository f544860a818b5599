"""`workbench inspect`: what an artifact is (architecture, dtype, parameters, size, quantization, which TP
sizes will load) and how it was made (its manifest's steps); ``check`` re-hashes every file the manifest
lists and fails on any difference."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import DTYPE_TABLE, MANIFEST_NAME, Checkpoint, numel, sha256_file
from .errors import ArtifactFailed, BadInput
from .gguffiles import gguf_parts, is_gguf_set
from .manifest import content_digest, manifest_path, read_manifest
from .safety import remote_code_request
from .preflight import preflight
from .quantkind import quant_of


def inspect(path: Path, tps: list[int], check: bool = False) -> dict:
    """What `workbench inspect` reports on ``path`` (a model folder or a .gguf file): what it is, its manifest's
    steps, its release state and verifications; ``tps``: the TP sizes to preflight; with ``check``, every file the
    manifest lists is re-hashed, and any difference is an ArtifactFailed."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"artifact not found: {path}")
    info = _gguf(path) if path.is_file() or is_gguf_set(path) else _folder(path, tps)
    manifest = read_manifest(path)
    info["steps"] = [
        {"verb": s.get("verb"), "started": s.get("started"), "status": s.get("status"), "seconds": s.get("seconds"),
         "metrics": {k: v for k, v in (s.get("metrics") or {}).items() if not isinstance(v, (dict, list))}}
        for s in (manifest or {}).get("steps", [])
    ]
    digest = content_digest(path)
    info["state"], info["state_reason"] = state_of(manifest, digest)
    # written by `workbench release`: which engines served it, at which TP sizes, with what result, and
    # whether it served these very bytes
    info["verifications"] = [
        {"engine": v["engine"], "engine_version": v.get("engine_version"), "tp": r["tp"], "passed": r["passed"],
         "token_agreement": r.get("token_agreement"), "kernels": v.get("kernels"),
         "kernels_logged": r.get("kernels_logged"), "reference_by": v.get("reference_by"), "of_these_bytes": v.get("artifact_sha256") == digest}
        for v in (manifest or {}).get("verifications", []) for r in v["runs"]
    ]
    if check:
        info["check"] = _check(path, manifest)
    return info


def state_of(manifest: dict | None, digest: str) -> tuple[str | None, str]:
    """The state `workbench release` recorded (served, checked, failed), else what the manifest shows. Served
    holds only while every verification it names served the artifact's bytes as they are (``digest``)."""
    if manifest is None:
        return None, "no workbench.json manifest"
    state = manifest.get("state")
    if state and state["state"] == "served":
        other = [v["stage"] for v in manifest.get("verifications", []) if v.get("artifact_sha256") != digest]
        if other:
            return "checked", f"{other[0]}: it served other bytes than these (the files changed since)"
    if state:
        return state["state"], state["reason"]
    steps = manifest.get("steps") or [{}]
    if steps[-1].get("status") == "failed":
        return "failed", f"{steps[-1].get('verb')} failed its checks"
    return "checked", "built and checked; no verification recorded in its manifest"


def _folder(path: Path, tps: list[int]) -> dict:
    ckpt = Checkpoint(path, code_check=False)  # describing runs nothing
    config = ckpt.config
    qc = config.get("quantization_config") or {}
    table = {}
    try:
        table = {str(tp): reasons for tp, reasons in preflight(config, tps).items()}
    except (KeyError, ValueError, TypeError):
        table = {}  # not a decoder config the preflight knows
    return {
        "path": str(path.absolute()), "kind": "folder",
        "architecture": (config.get("architectures") or ["?"])[0],
        "dtype": DTYPE_TABLE[ckpt.dtype_code][0],  # from the headers: describing a folder imports no torch
        "parameters": sum(numel(t.shape) for t in ckpt.store.tensors.values()),
        "size_bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
        "shards": len(ckpt.weight_files),
        "quantization": {"kind": quant_of(config).kind, **{k: qc[k] for k in ("quant_method", "activation_scheme", "ignored_layers",
                                                                               "format", "ignore") if k in qc}} if qc else None,
        "tp_preflight": table,
        "remote_code": _remote_code(path),
    }


def _remote_code(path: Path) -> str | None:
    """Which file asks for the folder's own code to run (the verbs refuse it without --trust-remote-code)."""
    found = remote_code_request(path)
    return f"{found[1]} in {found[0].name}" if found else None


def _gguf(path: Path) -> dict:
    """A .gguf file, or a split set (its folder or a part): the metadata from the first part, sizes over all."""
    if not is_gguf_set(path):
        raise BadInput(f"not a model folder or .gguf file: {path}")
    import gguf

    parts = gguf_parts(path)
    try:
        readers = [gguf.GGUFReader(p) for p in parts]
    except (ValueError, OSError) as exc:
        raise BadInput(f"not a readable GGUF file: {path}: {exc}") from None
    fields = readers[0].fields
    field = lambda key: fields[key].contents() if key in fields else None  # noqa: E731
    arch = field("general.architecture")
    file_type = field("general.file_type")
    tensors = [t for r in readers for t in r.tensors]
    return {
        "path": str(path.absolute()), "kind": "gguf", "architecture": arch,
        "file_type": gguf.LlamaFileType(file_type).name if file_type is not None else None,
        "parameters": sum(int(t.n_elements) for t in tensors), "size_bytes": sum(p.stat().st_size for p in parts),
        "tensors": len(tensors), "context_length": field(f"{arch}.context_length"), **({"parts": len(parts)} if len(parts) > 1 else {}),
    }


def _check(path: Path, manifest: dict | None) -> dict:
    if manifest is None:
        raise BadInput(f"no manifest to check against: {manifest_path(path)}")
    folder = path if path.is_dir() else path.parent
    problems = []
    for name, entry in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != entry["size"]:
            problems.append(f"{name}: size {file.stat().st_size}, manifest says {entry['size']}")
        elif sha256_file(file) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    if path.is_dir():
        listed = set(manifest.get("files", {})) | {MANIFEST_NAME}
        problems += [f"{p.name}: not in the manifest" for p in sorted(path.iterdir()) if p.is_file() and p.name not in listed]
    if problems:
        raise ArtifactFailed(f"{path}: {len(problems)} file(s) differ from the manifest: {'; '.join(problems)}")
    return {"files": len(manifest.get("files", {})), "ok": True}

