"""`workbench convert gguf`: a Hugging Face checkpoint to GGUF for llama.cpp, streamed.

Direct types (F32/F16/BF16/Q8_0) are written here with gguf-py's writer, one tensor at a time: every
tensor's info is declared from the safetensors headers first, then each tensor is read, converted and
written. K-quants and the other llama.cpp types are made from the F16 result by llama.cpp's own quantize
(llama-cpp-python's ``llama_model_quantize``), run in the llama.cpp engine's environment.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..checkpoint import Checkpoint, sha256_file
from ..engines import ENGINES, check_installed, cpu_threads, engine_python, usable_cpus
from ..errors import BadInput, check_fits
from ..hub import output_stem
from ..gguffiles import gguf_parts
from ..manifest import folder_digest, now, tool_versions, write_file_manifest, write_manifest
from ..options import Calibration, GgufOptions, TensorTypes
from ..outputs import atomic_output_dir, atomic_output_file
from ..runner import GGUF_SECONDS_PER_PARAMETER, Estimate, streamed_estimate
from .gguf_tables import OUTTYPES
from .imatrix import importance_matrix
from .llamacpp import prove_tokenizer, quantize_with_llamacpp, tokenizer_verdict
from .plan import Plan, check_tensor_types, plan_conversion
from .writer import quant_census, read_back, split_file, write_direct


def output_paths(model_dir: Path, outtypes: list[str], out: Path | None, split: bool = False) -> dict[str, Path]:
    """The GGUF file for each outtype: ``out`` itself when it is a ``.gguf`` path and one outtype is asked for,
    else ``<stem>-<TYPE>.gguf`` in the folder ``out``, or without ``out`` beside the model folder (output_stem).
    Split (``split``): each such path less its ``.gguf`` is a folder, holding the parts ``<its name>-00001-of-0000N.gguf``..."""
    named = output_stem(model_dir)
    stem = named.name
    if out is not None and len(outtypes) == 1 and str(out).endswith(".gguf"):
        return {outtypes[0]: Path(out).absolute().with_suffix("") if split else Path(out).absolute()}
    folder = Path(out).absolute() if out is not None else named.parent
    return {t: folder / f"{stem}-{OUTTYPES[t].label}{'' if split else '.gguf'}" for t in outtypes}


def gguf_estimate(model: Checkpoint) -> Estimate:
    """The streamed conversion: the largest tensor as read and one 16-bit copy or encoding of it (measured at the
    8B width, Q8_0 with its read-back: 1.9 GiB, against this estimate's 2.7 GiB). An importance matrix runs the
    model too: its walk is not counted."""
    return streamed_estimate(model, model.dtype.itemsize + 2, 0, GGUF_SECONDS_PER_PARAMETER)


def convert_gguf(model_dir: Path, o: GgufOptions, on_tensor: Callable[[int, int], None] | None = None,
                 on_event: Callable[[str], None] = lambda message: None, record: dict | None = None) -> list[dict]:
    """Write one GGUF per outtype of ``o`` (options.GgufOptions: the importance matrix, an accepted tokenizer
    difference, tensor types); returns one manifest step per file (``record``'s fields added to each). Every
    option is checked against the model's plan before anything is written."""
    model_dir = Path(model_dir)
    outtypes = list(o.outtypes)
    plan = plan_conversion(model_dir)
    plan.accept_tokenizer_difference = o.accept_tokenizer_difference
    paths = output_paths(model_dir, outtypes, o.out, bool(o.split_max_size))
    check_imatrix_use(outtypes, o.imatrix)
    check_tensor_types(plan, outtypes, o.tensor_types)
    needs = gguf_estimate(plan.model)
    check_fits(f"to convert {model_dir.name}", needs.peak_bytes, needs.duration())
    for path in paths.values():
        if path.exists() and not o.force:
            raise BadInput(f"output exists: {path} (use --force to replace it)")
    indirect = [t for t in outtypes if not OUTTYPES[t].direct]
    python = None
    if indirect or not plan.vocab.proven:  # llama.cpp's quantize, or the tokenizer proof
        spec = ENGINES["llamacpp"]
        python = engine_python(spec, o.llamacpp_python)
        check_installed(spec, python)
    with ThreadPoolExecutor(1) as pool:
        # the input's hash overlaps the conversion (hashlib releases the GIL)
        conversion = _Conversion(plan=plan, model_dir=model_dir, outtypes=outtypes, paths=paths, force=o.force, python=python,
                                 name=output_stem(model_dir).name, input_digest=pool.submit(folder_digest, model_dir),
                                 on_tensor=on_tensor, on_event=on_event, extra=record or {}, imatrix=o.imatrix,
                                 types=o.tensor_types, split_max_size=o.split_max_size)
        steps = _convert_all(conversion)
    return steps


def check_imatrix_use(outtypes: list[str], imatrix: Calibration | None) -> None:
    """Refuse outtypes that need an importance matrix without ``imatrix``, and an ``imatrix`` that none of
    ``outtypes`` uses (the direct types are written without llama.cpp's quantize)."""
    needing = [t for t in outtypes if OUTTYPES[t].needs_imatrix]
    if needing and imatrix is None:
        raise BadInput(f"llama.cpp makes {OUTTYPES[needing[0]].label} only with an importance matrix: add --imatrix")
    if imatrix is not None and all(OUTTYPES[t].direct for t in outtypes):
        raise BadInput("--imatrix applies to llama.cpp's quantize types (K- and IQ-quants, Q4_0...), not to "
                       f"{', '.join(OUTTYPES[t].label for t in outtypes)}")


@dataclass
class _Conversion:
    """One convert_gguf call: what every file it writes shares."""

    plan: Plan
    model_dir: Path
    outtypes: list[str]
    paths: dict[str, Path]  # outtype -> output file (split: output folder)
    force: bool
    python: str | None  # the llama.cpp engine's interpreter (quantize, the tokenizer proof)
    name: str  # general.name when the model card gives none
    input_digest: Future  # the input folder's sha256, hashed alongside the conversion
    on_tensor: Callable[[int, int], None] | None
    on_event: Callable[[str], None]
    extra: dict  # fields added to every manifest step
    imatrix: Calibration | None
    types: TensorTypes  # tensor types over the file type's
    split_max_size: int  # bytes of tensor data per part; 0: one file
    # texts llama.cpp tokenizes otherwise than transformers (accepted by the user); None until the first file
    # written proves a tokenizer that needs it
    tokenizer_differences: list[dict] | None = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer_differences = [] if self.plan.vocab.proven else None


def _convert_all(c: _Conversion) -> list[dict]:
    """Every outtype's file; returns their manifest steps. The direct types first, then llama.cpp's quantize types."""
    steps = [_write_direct_file(c, outtype) for outtype in c.outtypes if OUTTYPES[outtype].direct]
    indirect = [t for t in c.outtypes if not OUTTYPES[t].direct]
    if indirect:
        steps += _quantize_files(c, indirect)
    return steps


@contextlib.contextmanager
def _output(c: _Conversion, outtype: str) -> Iterator[tuple[Path, Path]]:
    """(what becomes the output, the .gguf path to write): one temporary file, or for a split set a temporary
    folder and the parts' path in it; renamed into place only when the block succeeds."""
    path = c.paths[outtype]
    if not c.split_max_size:
        with atomic_output_file(path, c.force) as tmp:
            yield tmp, tmp
        return
    with atomic_output_dir(path, c.force) as tmp:
        yield tmp, tmp / f"{path.name}.gguf"


def _write_direct_file(c: _Conversion, outtype: str) -> dict:
    t0, started = time.perf_counter(), now()
    c.on_event(f"writing {c.paths[outtype].name}")
    with _output(c, outtype) as (content, target):
        digest = write_direct(c.plan, outtype, target, c.name, c.on_tensor, c.types, c.split_max_size)
        step = _record_file(c, outtype, content, t0, started, digest)
    return step


def _quantize_files(c: _Conversion, indirect: list[str]) -> list[dict]:
    """llama.cpp's quantize types, all from one F16 pass (a scratch file unless a plain F16 file was asked for:
    one with tensor types chosen holds other types, which llama.cpp would quantize again)."""
    f16_path = None if c.types else c.paths.get("f16")
    # named like a partial output of the first quantization, so a killed run's scratch is cleaned up
    first = c.paths[indirect[0]]
    first.parent.mkdir(parents=True, exist_ok=True)
    scratch = None if f16_path else first.with_name(f".{first.name}.partial-f16-{os.getpid()}")
    imatrix_file = first.with_name(f".{first.name}.partial-imatrix-{os.getpid()}.npz")
    unsplit = first.with_name(f".{first.name}.partial-unsplit-{os.getpid()}")  # llama.cpp's output, before split_file
    try:
        if scratch is not None:
            c.on_event("writing the F16 pass for llama.cpp's quantize")
            write_direct(c.plan, "f16", scratch, c.name, c.on_tensor)
        imatrix, imatrix_options = _importance_matrix(c, imatrix_file) if c.imatrix is not None else (None, None)
        steps = []
        for outtype in indirect:
            t0, started = time.perf_counter(), now()
            c.on_event(f"llama.cpp quantize -> {c.paths[outtype].name}")
            with _output(c, outtype) as (content, target):
                quantized = unsplit if c.split_max_size else target
                quantize_with_llamacpp(f16_path or scratch, quantized, outtype, c.python, cpu_threads(usable_cpus(), dict(os.environ)),
                                       imatrix, c.types)
                if c.split_max_size:
                    split_file(unsplit, target, c.split_max_size)
                    unsplit.unlink()
                steps.append(_record_file(c, outtype, content, t0, started, None if c.split_max_size else sha256_file(target),
                                          imatrix_options))
        return steps
    finally:
        if scratch is not None:
            scratch.unlink(missing_ok=True)
        imatrix_file.unlink(missing_ok=True)
        unsplit.unlink(missing_ok=True)


def _importance_matrix(c: _Conversion, imatrix_file: Path) -> tuple[dict, dict]:
    """llama.cpp's importance matrix on the calibration text, saved to ``imatrix_file``; returns the quantize
    script's imatrix argument and the options the manifests record."""
    cal = c.imatrix
    c.on_event(f"importance matrix on {cal.samples} x {cal.seq_len} tokens of {cal.data}, layer by layer")
    clock = time.perf_counter()
    computed = importance_matrix(c.model_dir, {t.hf_name: t.gguf_name for t in c.plan.tensors if t.hf_name}, cal,
                                 stacks={t.gguf_name: t.experts for t in c.plan.tensors if t.experts})
    computed.save(imatrix_file)
    imatrix = {"path": str(imatrix_file), "file": "workbench (layer runner)", "dataset": cal.data,
               "chunks": computed.chunks}
    options = {"data": cal.data, "samples": cal.samples, "seq_len": cal.seq_len, "seed": cal.seed,
               "entries": len(computed.values), "seconds": round(time.perf_counter() - clock, 2),
               **({"experts_never_routed": computed.never_routed} if computed.never_routed else {})}
    return imatrix, options


def _record_file(c: _Conversion, outtype: str, content: Path, t0: float, started: str, sha256: str | None,
                 imatrix_options: dict | None = None) -> dict:
    """The manifest (a file's sidecar, a split set's in its folder), written before the output is renamed into
    place (see write_file_manifest); returns its step. The first file written proves an unnamed pre-tokenizer
    first (a failure leaves nothing). ``content``: the temporary file or folder; ``sha256``: the file's, if known."""
    parts = gguf_parts(content)
    if c.tokenizer_differences is None:
        c.tokenizer_differences = prove_tokenizer(c.plan, parts[0], c.python)
        tokenizer_verdict(c.plan, c.tokenizer_differences, c.on_event)
    path, differences, plan = c.paths[outtype], c.tokenizer_differences, c.plan
    accepted = {"accept_tokenizer_difference": True} if plan.accept_tokenizer_difference else {}
    step = {
        "verb": "convert-gguf", "started": started, "seconds": round(time.perf_counter() - t0, 2),
        "inputs": {"model": c.input_digest.result()},
        "options": {"outtype": outtype, "out": str(path), **({"imatrix": imatrix_options} if imatrix_options else {}), **accepted,
                    **({"tensor_types": c.types.as_dict()} if c.types else {}),
                    **({"split_max_size": c.split_max_size} if c.split_max_size else {})},
        **({"tokenizer_differences": differences} if differences else {}),
        "versions": tool_versions(),
        "metrics": {"tensors": len(plan.tensors), "file_type": OUTTYPES[outtype].label, "bytes": sum(p.stat().st_size for p in parts),
                    **({"parts": len(parts), "largest_part_bytes": max(p.stat().st_size for p in parts)} if c.split_max_size else {}),
                    "tokenizer": plan.vocab.model, "pre_tokenizer": plan.vocab.pre, **quant_census(content, OUTTYPES[outtype].label),
                    "read_back": read_back(plan, content)},
        "warnings": plan.warnings, "status": "ok", **c.extra,
    }
    if c.split_max_size:
        write_manifest(content, step, parent=c.model_dir, known_sha256={})
    else:
        write_file_manifest(path, step, parent=c.model_dir, sha256=sha256, content=content)
    return {"output": str(path), **step}
