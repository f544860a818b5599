"""Read-back of a written GGUF: every tensor decoded by gguf-py's own dequantizer (``gguf.quants``), never by
the workbench's code, and compared with the source tensor as the converter meant it (read, experts stacked,
q/k permuted, offset), one tensor at a time and a block of rows at a time (peak memory: one block).

Judged per tensor, by what its type allows:

- types gguf-py encodes itself (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: round to nearest, no search): the
  decoded tensor against gguf-py's encoding of the source, decoded. A file the workbench wrote reads 0 off it;
  llama.cpp's quantize starts from an F16 pass and rounds with its own arithmetic, so it picks a neighbouring
  code for some values: at most ENCODER_SHARE of the type's own rounding error (0.33 measured on a random
  model's Q8_0 fallback), so the limit follows from the format, not from one model.
- K- and i-quants (llama.cpp's search, importance-weighted; gguf-py only decodes them): the error against the
  source at most SEARCHED_LIMITS times gguf-py's own Q4_0 round-to-nearest error on the same tensor. In a file
  llama.cpp quantized with an importance matrix (its quantize.imatrix.* keys), Q4_0/Q4_1/Q5_0/Q5_1 come from the
  same weighted search instead of rounding to nearest, so they are judged this way too (measured: a Q5_0
  fallback of the Qwen3-MoE fixture's experts read 4.91% off gguf-py's rounding, past the 4.38% rounding allows).
- every tensor: the least-squares gain from the source to the decoded tensor within GAIN_LIMIT of 1 (a wrong
  block scale moves it).

A tensor of a type with no rule here is listed as not judged, never as passed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
ENCODED_BY_GGUF_PY = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
# a searched type's error as a multiple of Q4_0 round-to-nearest on the same tensor: ~2x per bit fewer, with a
# 1.5x margin (Q4_K_M's 4-bit tensors read 0.6-0.9x on the trained fixture, Q6_K 0.2-0.3x)
SEARCHED_LIMITS = {Q.Q6_K: 0.5, Q.Q5_K: 0.8, Q.Q4_K: 1.5, Q.IQ4_NL: 1.5, Q.IQ4_XS: 1.5, Q.Q3_K: 3.0, Q.IQ3_S: 3.0,
                   Q.IQ3_XXS: 3.0, Q.Q2_K: 6.0, Q.IQ2_S: 6.0, Q.IQ2_XS: 6.0, Q.IQ2_XXS: 6.0}
# round-to-nearest types llama.cpp's quantize searches instead when it is given an importance matrix
WEIGHTED_LIMITS = {Q.Q5_0: 0.8, Q.Q5_1: 0.8, Q.Q4_0: 1.5, Q.Q4_1: 1.5}
ENCODER_SHARE = 1.0
EXACT = 1e-6  # F32 (no rounding): relative difference allowed from float32 summation
GAIN_LIMIT = 0.05
ROW_BLOCK_ELEMENTS = 1 << 21


@dataclass
class TensorReading:
    """One tensor of a GGUF read back: its relative error and gain against the source, and the limit it is judged on."""
    tensor: str  # the GGUF name
    type: str
    error: float  # ||decoded - source|| / ||source||
    gain: float
    off_expected: float | None = None  # ||decoded - expected|| / ||source|| (types gguf-py encodes)
    limit: float | None = None  # on off_expected, or on error (searched types); None: not judged


@dataclass
class GgufReadBack:
    """The read-back of one GGUF file: one reading per tensor, in file order."""
    readings: list[TensorReading] = field(default_factory=list)

    def failures(self) -> list[str]:
        """One line per tensor off by more than its limit or with a gain more than GAIN_LIMIT from 1; empty: passed."""
        out = []
        for r in self.readings:
            judged = r.off_expected if r.off_expected is not None else r.error
            if r.limit is not None and not judged <= r.limit:
                what = "from gguf-py's own encoding of the source" if r.off_expected is not None else "from the source"
                out.append(f"{r.tensor} ({r.type}): decoded by gguf-py, {judged:.2%} off {what} (gain {r.gain:.3f}), "
                           f"past the {r.limit:.2%} a correct {r.type} tensor stays within")
            elif not abs(r.gain - 1) <= GAIN_LIMIT:
                out.append(f"{r.tensor} ({r.type}): decoded by gguf-py, gain {r.gain:.3f} from the source's values "
                           f"(a correct tensor stays within {GAIN_LIMIT:.0%} of 1)")
        return out

    def as_dict(self) -> dict:
        """The summary the manifest and report keep (describe_gguf's input): counts, the worst tensor, failures."""
        judged = [r for r in self.readings if r.limit is not None]
        worst = max(self.readings, key=lambda r: r.error, default=None)
        return {"reader": f"gguf-py {_version()}", "tensors": len(self.readings), "judged": len(judged),
                "not_judged": sorted({r.type for r in self.readings if r.limit is None}),
                "max_error": round(worst.error, 5) if worst else None, "where": worst.tensor if worst else None,
                "max_gain_deviation": round(max((abs(r.gain - 1) for r in self.readings), default=0.0), 5),
                "failures": self.failures()}


def describe_gguf(read: dict) -> str:
    """One line for the console and the report."""
    head = (f"{read['judged']} of {read['tensors']} tensors decoded by {read['reader']} within their type's limits; "
            f"largest error from the source {read['max_error']:.2%} ({read['where']})")
    if read["not_judged"]:
        head += f"; not judged (no rule for): {', '.join(read['not_judged'])}"
    return head if not read["failures"] else f"{len(read['failures'])} tensors off: {read['failures'][0]}"


def read_back_gguf(parts: list[Path], sources: dict[str, Callable[[], torch.Tensor]]) -> GgufReadBack:
    """The tensors of a GGUF's ``parts`` (one file, or a split set in order), by GGUF name, against ``sources``
    (GGUF name -> the source tensor as the converter meant it); a tensor in the file without a source, or a
    source missing from the file, is a failure."""
    readers = [gguf.GGUFReader(p) for p in parts]
    weighted = "quantize.imatrix.entries_count" in readers[0].fields  # the keys are in the first part
    searched = {**SEARCHED_LIMITS, **(WEIGHTED_LIMITS if weighted else {})}
    result = GgufReadBack()
    found = set()
    for t in (t for reader in readers for t in reader.tensors):
        found.add(t.name)
        if t.name not in sources:
            raise GgufReadBackError(f"{t.name}: in the file, but the converter wrote no such tensor")
        result.readings.append(_read_tensor(t, sources[t.name](), searched))
    missing = sorted(set(sources) - found)
    if missing:
        raise GgufReadBackError(f"{missing[0]}: the converter wrote it, the file has no such tensor")
    return result


class GgufReadBackError(Exception):
    """The file does not hold the tensors the converter wrote."""


def _read_tensor(t, source: torch.Tensor, searched: dict[Q, float]) -> TensorReading:
    """One tensor's sums, a block of rows at a time: decoded, source, and (for types gguf-py encodes and llama.cpp
    did not search: ``searched``, type -> limit) expected."""
    qtype = Q(t.tensor_type)
    src_rows = source.reshape(-1, source.shape[-1])  # in float32 a block at a time (an 8B's embedding: 2 GiB at once)
    sums = np.zeros(6)  # |d-s|^2, |s|^2, d.s, |d-e|^2, |e-s|^2 (expected's own error), |q4-s|^2 (Q4_0 RTN)
    baseline = qtype in searched and src_rows.shape[1] % 32 == 0
    encodable = qtype in ENCODED_BY_GGUF_PY and qtype not in searched
    for rows, decoded in _decoded_blocks(t, qtype, src_rows.shape):
        s = src_rows[rows].float().numpy()
        sums[:3] += (((decoded - s) ** 2).sum(), (s ** 2).sum(), (decoded * s).sum())
        if encodable:
            expected = gguf.quants.dequantize(gguf.quants.quantize(s, qtype), qtype).reshape(s.shape)
            sums[3:5] += (((decoded - expected) ** 2).sum(), ((expected - s) ** 2).sum())
        if baseline:
            q4 = gguf.quants.dequantize(gguf.quants.quantize(s, Q.Q4_0), Q.Q4_0).reshape(s.shape)
            sums[5] += ((q4 - s) ** 2).sum()
    norm = max(float(np.sqrt(sums[1])), 1e-30)
    error, gain = float(np.sqrt(sums[0])) / norm, float(sums[2] / max(sums[1], 1e-30))
    reading = TensorReading(t.name, qtype.name, error, gain)
    if encodable:
        reading.off_expected = float(np.sqrt(sums[3])) / norm
        reading.limit = max(ENCODER_SHARE * float(np.sqrt(sums[4])) / norm, EXACT)
    elif baseline:
        reading.limit = searched[qtype] * float(np.sqrt(sums[5])) / norm
    return reading


def _decoded_blocks(t, qtype: Q, shape: tuple[int, int]) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows, gguf-py's float32 decoding of those rows) over the tensor, a block of rows at a time."""
    data = t.data.reshape(shape[0], -1)  # one row of the tensor per row of its (quantized) bytes
    step = max(1, ROW_BLOCK_ELEMENTS // shape[1])
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        block = np.asarray(data[rows])
        decoded = block.astype(np.float32) if qtype in (Q.F32, Q.F16) else gguf.quants.dequantize(block, qtype)
        yield rows, decoded.reshape(rows.stop - rows.start, shape[1]).astype(np.float32)


def _version() -> str:
    from importlib.metadata import version

    return version("gguf")
