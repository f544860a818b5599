"""`workbench merge`: fold a peft LoRA adapter into its base, streamed tensor by tensor.

Why not peft's ``merge_and_unload``: it loads the whole model, merges in the weights' dtype, and on a
tied model it edits the shared embedding in place. Here the adapter's effect is computed from the
adapter file itself, exactly as peft's unmerged forward pass applies it, in float32, one base tensor at
a time (lora.py); every check runs before the output folder is created.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CONFIG_NAME, Checkpoint, PlannedTensor, StreamedWriter, copy_side_files, plan_shards, write_json
from .errors import ArtifactFailed, check_fits
from .hf import torch_threads
from .lora import MergePlan, OutputTensor, merged_tensor, output_shape, plan_merge
from .hub import output_stem
from .manifest import folder_digest, now, tool_versions, write_manifest
from .options import MergeOptions
from .outputs import atomic_output_dir
from .runner import MERGE_SECONDS_PER_PARAMETER, Estimate, streamed_estimate


def default_output(adapter: Path) -> Path:
    """Where a merge writes when no output is named: ``<adapter>-merged`` beside the adapter folder (for a hub
    snapshot, named after its repository, in the working folder)."""
    return Path(f"{output_stem(adapter)}-merged")


def merge(base: Path, adapter: Path, o: MergeOptions, on_event: Callable[[str], None] = lambda message: None,
          on_tensor: Callable[[int, int], None] | None = None, record: dict | None = None) -> dict:
    """The merge verb: every check (plan_merge) before anything is written, its warnings and what it will merge
    to ``on_event``, then the streamed write (run_merge); returns the step recorded in workbench.json."""
    plan = plan_merge(base, adapter, o.dtype, o.base_quant, o.double_quant)
    needs = merge_estimate(plan.base)
    check_fits(f"to merge into {Path(base).name}", needs.peak_bytes, needs.duration())
    for warning in plan.warnings:
        on_event(f"warning: {warning}")
    on_event(f"merging {len(plan.deltas)} LoRA modules into {len(plan.outputs)} tensors")
    options = {"base": str(base), "adapter": str(adapter), "out": str(o.out), "dtype_option": o.dtype}
    return run_merge(plan, o.out, o.force, o.max_shard_bytes, options, on_tensor, record)


def merge_estimate(base: Checkpoint) -> Estimate:
    """The streamed merge: untouched tensors are copied in pieces; a merged matrix is read in its dtype, worked
    in float32 and written in its dtype (measured at the 8B width: 761 MiB, against this estimate's 1.2 GiB)."""
    size = base.dtype.itemsize
    return streamed_estimate(base, 0, 2 * size + 4, MERGE_SECONDS_PER_PARAMETER)


def run_merge(
    plan: MergePlan,
    out: Path,
    force: bool = False,
    max_shard_bytes: int | None = None,
    options: dict | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
    record: dict | None = None,
) -> dict:
    """Write the merged checkpoint to ``out`` (atomically) and return the step recorded in workbench.json
    (with ``record``'s fields added: the release records its stage key there)."""
    started, t0 = now(), time.perf_counter()
    planned = [PlannedTensor(o.name, plan.dtype if _is_float(o, plan) else _dtype(o, plan), output_shape(o, plan.base, plan.adapter)) for o in plan.outputs]
    shards = plan_shards(planned, max_shard_bytes or plan.base.largest_file_bytes)
    probe: dict = {}
    # the merge is memory-bound and sha256 runs on two worker threads: one intra-op thread leaves the
    # second core to them (1.1B model, 2 cores: 4.1 s with 1 thread, 4.5 s with 2)
    with torch_threads(1), ThreadPoolExecutor(1) as pool, atomic_output_dir(out, force) as tmp:
        # input hashes overlap the merge (hashlib releases the GIL)
        digests = [pool.submit(folder_digest, p) for p in (plan.base.path, plan.adapter_dir)]
        writer = StreamedWriter(tmp, shards)
        workspace = torch.empty(max((p.nbytes // p.dtype.itemsize for o, p in zip(plan.outputs, planned) if o.delta), default=0))
        for i, o, p in zip(range(len(planned)), plan.outputs, planned):
            store = plan.adapter if o.from_adapter else plan.base.store
            if o.delta is None and store.tensors[o.source].dtype == p.dtype and not plan.requantized(o):
                writer.copy(store, o.name, o.source)  # unchanged: a block of rows at a time
            else:
                writer.write(o.name, merged_tensor(o, plan, probe, workspace))
            if on_tensor:
                on_tensor(i + 1, len(plan.outputs))
        _gate_self_check(probe, plan.dtype)  # before anything is renamed into place
        write_json(tmp / CONFIG_NAME, plan.config)
        copy_side_files(plan.side_files, tmp)
        inputs = dict(zip(("base", "adapter"), (f.result() for f in digests)))
        step = {
            "verb": "merge",
            "started": started,
            "seconds": round(time.perf_counter() - t0, 3),
            "inputs": inputs,
            "options": {**(options or {}), "dtype": str(plan.dtype).removeprefix("torch."),
                        "base_quant": plan.base_quant.describe() if plan.base_quant else None},
            "versions": tool_versions(),
            "metrics": {
                "tensors_written": len(plan.outputs),
                "lora_modules_merged": len(plan.deltas),
                "dora_modules": sum(1 for d in plan.deltas if d.magnitude),
                "tensors_replaced": sum(1 for o in plan.outputs if o.from_adapter),
                "base_weights_requantized": sum(1 for o in plan.outputs if plan.requantized(o)),
                "shards": len(shards),
                "self_check_modules": probe.get("modules", 0),
                "self_check_max_rel_error": probe.get("max_rel_error", 0.0),
                "self_check_worst_tensor": probe.get("worst_tensor"),
            },
            "warnings": plan.warnings,
            "status": "ok",
            **(record or {}),
        }
        write_manifest(tmp, step, parent=plan.base.path, known_sha256=writer.sha256)
    return step


def self_check_tolerance(dtype: torch.dtype) -> float:
    """The largest relative error the self-check accepts: twice the written dtype's machine epsilon (the
    rounding of each written weight, ~1e-3 measured for bfloat16), at least 1e-5 (float32 summation order)."""
    return max(2 * torch.finfo(dtype).eps, 1e-5) if dtype.is_floating_point else 1e-5


def _gate_self_check(probe: dict, dtype: torch.dtype) -> None:
    """An artifact whose written weights do not do what the adapter does is refused (exit 1), NaN included."""
    err, limit = probe.get("max_rel_error", 0.0), self_check_tolerance(dtype)
    if not err <= limit:
        raise ArtifactFailed(f"merge self-check failed: {probe.get('worst_tensor')} is {err:.2e} off W·x + s·B(A·x) "
                             f"(tolerance {limit:.1e} for {str(dtype).removeprefix('torch.')}); nothing was written")


def _is_float(o: OutputTensor, plan: MergePlan) -> bool:
    return _dtype(o, plan).is_floating_point


def _dtype(o: OutputTensor, plan: MergePlan) -> torch.dtype:
    return (plan.adapter if o.from_adapter else plan.base.store).tensors[o.source].dtype
