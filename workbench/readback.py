"""Read-back: a quantized artifact decoded by its format's own library, never by the workbench's code, and
every quantized Linear's output compared with the source's on the same real inputs, one decoder layer at a
time through the layer runner, in float32 (peak memory: each model's layer in its stored dtype, and one module's
weight in float32 at a time; the libraries decode and round a block of rows at a time).

Readers, by ``quantization_config.quant_method``:

- ``compressed-tensors``: its model-free dequantizer (``CompressedTensorsDequantizer``: the schemes of
  config.json, each format's own compressor) decodes the weights; its activation quantizer
  (``forward_quantize``) quantizes dynamically quantized inputs as the scheme says, and a static input
  scale is checked against the held-out inputs' range (see InputQuantization).
- ``fp8`` (vLLM's format): the same tensors described to compressed-tensors as ``float-quantized`` with
  per-tensor weight and input scales and the ignored layers as its ignore list. Nothing is rewritten, so
  compressed-tensors reads the bytes as written. transformers cannot be this reader: it drops the
  per-tensor ``weight_scale``/``input_scale`` of this format (it expects block-wise ``weight_scale_inv``).
- ``fp8`` with ``weight_block_size`` (the DeepSeek-V3 / Qwen3 block format): compressed-tensors'
  ``FP8BlockDequantizer``, written for exactly these checkpoints, decodes ``weight`` x ``weight_scale_inv``;
  its activation quantizer quantizes each input per token and group of 128, as the format's GPU kernels do.
- ``bitsandbytes``: bitsandbytes' ``QuantState.from_dict`` and ``dequantize_4bit``, what its 4-bit Linear
  computes with.

Per module: ``error`` = ||reader's output - source's|| / ||source's|| and ``gain`` = the least-squares
factor from the source's output to the reader's. A reader's own refusal (a missing scale, a shape it cannot
unpack) names its tensor too.

The limits follow from the format, not from a fixture: each layer is run a third time with the source's own
weights rounded to nearest under the same scheme by the libraries that write these formats (llm-compressor's
min-max observer and compressed-tensors' quantizer; bitsandbytes' ``quantize_4bit`` for its format), which is
the error that scheme costs on that layer of that model (``rounding``). A layer passes within
ROUNDING_MULTIPLE of it, its gain within its rounding error of the rounded layer's. Where the format is
written by round-to-nearest alone (the workbench's FP8, per tensor or per block; bitsandbytes' 4-bit), the
decoded layer must moreover be the rounded one (``from_rounding`` ~0); where an algorithm chose the values
(GPTQ, AWQ, SmoothQuant: compressed-tensors does not say which), the multiple bounds it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import types
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from . import experts, kvcache
from .checkpoint import Checkpoint
from .errors import ArtifactFailed, BadInput
from .hf import library_logs_to_stderr
from .quantkind import quant_of
from .runner import COMPUTE_DTYPE, LayerRunner

ACTIVATION_PARAMS = {"input_scale", "input_zero_point", "input_global_scale", "k_scale", "v_scale"}  # read per call
SAMPLES, SEQ_LEN = 4, 128  # held-out tokens per read-back: every quantized module sees 512 real inputs
# a layer (or a weight outside the layers) may differ from the source by this multiple of what rounding the
# source's weights to nearest under the same scheme costs there; GPTQ and AWQ choose values closer than that
ROUNDING_MULTIPLE = 1.5
# where the format is round-to-nearest alone, the decoded layer's distance from the rounded one, as a share
# of the rounding error itself (ties and the scale's float precision: measured ~0, see tests/test_readback.py)
EXACT_SHARE = 0.1
ERROR_FLOOR = 1e-3  # below this, float noise: a layer nothing quantized
ROUNDING_BLOCK = 2**24  # weight elements rounded or decoded at a time (the libraries' float32 temporaries: ~64 MB each)
ROW_GROUP = 128  # rows decoded or rounded at a time are a multiple of this: a block of FP8_BLOCK's scales, 16 packed zero points
FP8_LARGEST = 448.0  # float8_e4m3fn
SATURATED_LIMIT = 0.05  # share of a module's held-out inputs past its static scale's range
# a module this many times the median error of the same module in the other layers, and past the floor
OUTLIER, OUTLIER_FLOOR = 4.0, 0.10
# a module's output error flows into every module after it (v_proj's into o_proj, at the same size): the layer
# names the first module called whose error is at least this share of the layer's worst, where it starts
INHERITED_SHARE = 0.8


@dataclass
class ModuleReading:
    """One reading of a read-back: a decoded module's output (or a layer's update, or a KV-cache scale's share of
    clipped inputs) against the source's, with the round-to-nearest figures it is judged by; ``role`` says which."""
    module: str
    error: float
    gain: float
    clipped: float = 0.0  # share of its held-out inputs past its static input scale's range
    rounding: float | None = None  # "layer" and "weight": the same scheme's round-to-nearest error from the source
    rounding_gain: float = 1.0
    from_rounding: float | None = None  # the decoded's distance from that rounding, relative to the source's
    role: str = "module"  # "module": inside a decoder layer, judged through "layer", its layer's update;
    # "weight": a decoded module outside the layers (lm_head), judged weight to weight; "kv": a KV-cache scale
    # (``module`` is the tensor), judged by the share of held-out keys or values past its range (``clipped``)


@dataclass
class ReadBack:
    """The read-back of one quantized artifact: the reader that decoded it, its quantization kind, and one reading
    per module, layer and KV-cache scale, or the reader's own refusal."""
    reader: str
    kind: str
    modules: list[ModuleReading] = field(default_factory=list)
    refusal: str | None = None  # the reader's own error, naming its tensor
    exact: bool = False  # the format is round-to-nearest alone: decoded layers must be the rounded source's

    def failures(self) -> list[str]:
        """Every layer (and module outside the layers) past what its scheme's rounding allows, naming the
        decoded module of the layer furthest from the source's; and every module far past the same module in
        the other layers."""
        if self.refusal:
            return [self.refusal]
        if not any(m.role in ("module", "weight") for m in self.modules):
            return [f"{self.reader} decoded no quantized module, though config.json says the model is quantized: "
                    "nothing was read back"]
        out, named = [], set()
        for m in self.modules:
            why = self._past_rounding(m) if m.role in ("layer", "weight") else None
            if why is None:
                continue
            worst = _origin([p for p in self.modules if p.role == "module" and p.module.startswith(m.module.split(" ")[0] + ".")]) or m
            named.add(worst.module)
            out.append(f"{worst.module}: read by {self.reader}, its output differs from the source's by "
                       f"{worst.error:.1%} (gain {worst.gain:.3f}); {m.module} {why}")
        for m in self.modules:
            if m.clipped > SATURATED_LIMIT:
                what = (f"{m.module}: {m.clipped:.0%} of the held-out {'keys' if m.module.endswith('k_scale') else 'values'}"
                        if m.role == "kv" else f"{m.module}.input_scale: {m.clipped:.0%} of the module's held-out inputs")
                out.append(f"{what} lie past the largest value it represents (more than {SATURATED_LIMIT:.0%}: a scale that "
                           "is not their range)")
        for m, typical in self._outliers():
            if m.module not in named:
                out.append(f"{m.module}: read by {self.reader}, its output differs from the source's by {m.error:.1%} "
                           f"(gain {m.gain:.3f}), {m.error / typical:.0f}x the same module's in the other layers ({typical:.1%})")
        return out

    def _past_rounding(self, m: ModuleReading) -> str | None:
        """Why ``m`` (a layer's update or a weight outside the layers) is not what its scheme gives the source,
        or None."""
        rounding = m.rounding or 0.0
        if not m.error <= max(ROUNDING_MULTIPLE * rounding, ERROR_FLOOR):
            return (f"{m.error:.1%} off, past {ROUNDING_MULTIPLE:g}x the {rounding:.1%} that rounding the source's "
                    f"weights to nearest under the same scheme costs there")
        if not abs(m.gain - m.rounding_gain) <= max(rounding, ERROR_FLOOR):
            return (f"gain {m.gain:.3f} against {m.rounding_gain:.3f} rounded to nearest: further apart than the "
                    f"{rounding:.1%} the rounding itself costs")
        if self.exact and not (m.from_rounding or 0.0) <= max(EXACT_SHARE * rounding, ERROR_FLOOR):
            return (f"{m.from_rounding:.2%} from the source rounded to nearest, which this format is (more than "
                    f"{EXACT_SHARE:.0%} of the rounding's own {rounding:.1%})")
        return None

    def _outliers(self) -> list[tuple[ModuleReading, float]]:
        """(module, the median error of its kind of module over the layers) for modules whose error is past
        OUTLIER times that median and OUTLIER_FLOOR: one broken module in a layer whose sum still passes."""
        by_kind: dict[str, list[float]] = {}
        for m in self.modules:
            if m.role == "module":
                by_kind.setdefault(_module_kind(m.module), []).append(m.error)
        out = []
        for m in self.modules:
            if m.role == "module":
                typical = sorted(by_kind[_module_kind(m.module)])[len(by_kind[_module_kind(m.module)]) // 2]
                if not m.error <= max(OUTLIER * typical, OUTLIER_FLOOR):
                    out.append((m, max(typical, 1e-9)))
        return out

    def as_dict(self) -> dict:
        """The read-back as the report records it (``describe`` prints it): reader, limits, counts, the worst
        judged reading against its rounding, the refusal and the failures."""
        judged = [m for m in self.modules if m.role != "module"]
        rounded = [m for m in judged if m.role in ("layer", "weight")]
        worst = max(judged, key=lambda m: m.error, default=None)
        return {"reader": self.reader, "kind": self.kind, "exact": self.exact,
                "limits": {"rounding_multiple": ROUNDING_MULTIPLE, **({"exact_share": EXACT_SHARE} if self.exact else {})},
                "decoded_modules": len([m for m in self.modules if m.role in ("module", "weight")]),
                "kv_scales_checked": len([m for m in self.modules if m.role == "kv"]),
                "judged": len(judged), "where": worst.module if worst else None,
                "max_error": round(worst.error, 4) if worst else None,
                "max_of_rounding": round(max((m.error / max(m.rounding or 0.0, ERROR_FLOOR) for m in rounded), default=0.0), 3),
                "max_from_rounding": round(max((m.from_rounding or 0.0 for m in rounded), default=0.0), 5),
                "max_gain_deviation": round(max((abs(m.gain - m.rounding_gain) for m in rounded), default=0.0), 4),
                "refusal": self.refusal, "failures": self.failures()}


def _origin(modules: list[ModuleReading]) -> ModuleReading | None:
    """Of a layer's modules (in the order the layer calls them), the first with a NaN error, else the first
    whose error is at least INHERITED_SHARE of the largest."""
    if not modules:
        return None
    nan = [m for m in modules if m.error != m.error]
    largest = max(m.error for m in modules)
    return nan[0] if nan else next(m for m in modules if m.error >= INHERITED_SHARE * largest)


def describe(read: dict) -> str:
    """One line for a read-back as ``ReadBack.as_dict`` records it."""
    if read["refusal"]:
        return read["refusal"]
    if read["failures"]:
        return "; ".join(read["failures"][:3])
    exact = f"; {read['max_from_rounding']:.2%} from it at most" if read.get("exact") else ""
    return (f"{read['reader']} decoded {read['decoded_modules']} modules; each layer within {read['max_of_rounding']:.2f}x "
            f"what rounding the source to nearest under the same scheme costs (limit {read['limits']['rounding_multiple']:g}x; "
            f"largest error {read['max_error']:.1%}, {read['where']}){exact}")


@dataclass
class InputQuantization:
    """A module's input quantization as its scheme says. ``quantize`` applies it (the library's own function,
    with the written scales). The read-back applies a ``dynamic`` one (scales from each input) and only checks
    a static one for the share of held-out inputs past the largest value its written scale represents
    (clipping on other text is calibration quality, which quantize's report measures; a scale of 0 clips
    everything); the quality report of an artifact applies both (``decoded_final_hidden``)."""

    quantize: object  # x -> x quantized and dequantized
    dynamic: bool = True
    largest: float = 0.0  # static: the largest input the written scale represents


class ReaderRefused(Exception):
    """The format's library could not decode a tensor; the message names it."""


def _version(package: str) -> str:
    from importlib.metadata import version

    return f"{package} {version(package)}"


class CompressedTensorsReader:
    """compressed-tensors' own decoding of its checkpoints (and of vLLM's fp8, described to it)."""

    def __init__(self, artifact: Path, quant: dict):
        from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

        self.name = _version("compressed-tensors")
        try:
            self.dequantizer = CompressedTensorsDequantizer(artifact, dtype=torch.float32)
        except ValueError as exc:
            raise ReaderRefused(f"{self.name} cannot read the quantization_config: {exc}") from None
        self.schemes = list(self.dequantizer.quant_config.config_groups.values())
        self.exact = False  # compressed-tensors' config does not say whether GPTQ, AWQ or SmoothQuant chose the values

    def rounded(self, module: str, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The source's ``weight`` of ``module`` rounded to nearest under the module's scheme, decoded."""
        return _rounded_to_nearest(weight, self._scheme(module).weights)

    def weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decoded weights by module name, for the quantized modules among ``tensors`` (one module's tensors
        at a time, so that a refusal names its module)."""
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            module, _, param = name.rpartition(".")
            if param not in ACTIVATION_PARAMS:
                by_module.setdefault(module, {})[name] = tensor
        decoded = {}
        for module, own in by_module.items():
            if self._ignored(module) and all(n.endswith((".weight", ".bias")) for n in own):
                continue  # left in its dtype, as the config says: decoding it costs a float32 copy (the lm_head's)
            weight = self._decoded(module, own)
            if weight is not None:
                decoded[module] = weight
        return decoded

    def _decoded(self, module: str, own: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``module``'s weight decoded in float32 by the dequantizer (None: passed through untouched, not
        quantized), a block of rows at a time where its tensors split by rows: its unpacking holds ~5 float32
        copies of what it decodes (1.3 GB for one NVFP4 matrix at the 8B width)."""
        packed = next((t for n, t in own.items() if n.endswith((".weight", ".weight_packed"))), None)
        rows = packed.shape[0] if packed is not None and packed.dim() == 2 else 0
        step = _row_step(2 * packed[0].numel() * packed.element_size() if rows else 1)  # values of 4 bits at least
        cuts = rows > step and all(n.endswith(".weight_shape") or _rows_per_entry(t, rows) is not None for n, t in own.items())
        if not cuts:
            return self._validate(module, own)
        out = None
        for start in range(0, rows, step):
            part = self._validate(module, _rows_of_module(own, rows, start, start + step))
            if part is None:
                return None
            out = out if out is not None else torch.empty((rows, *part.shape[1:]), dtype=torch.float32)
            out[start:start + part.shape[0]] = part
        return out

    def _validate(self, module: str, own: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The dequantizer's float32 weight of ``module`` from ``own``; None where it passed the weight through."""
        try:
            out = self.dequantizer.validate(dict(own))
        except (ValueError, KeyError, RuntimeError, IndexError) as exc:
            raise ReaderRefused(f"{module}: {self.name} cannot decode it: {str(exc).splitlines()[0]}") from None
        weight = out.get(module + ".weight")
        return None if weight is None or _same(own.get(module + ".weight"), weight) else weight.float()

    def activations(self, module: str, tensors: dict[str, torch.Tensor]) -> "InputQuantization | None":
        """The scheme's input quantization of ``module`` (None: activations stay in float)."""
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        args = self._scheme(module).input_activations
        if args is None:
            return None
        state = types.SimpleNamespace(quantization_status=QuantizationStatus.FROZEN,
                                      **{f"input_{p}": tensors.get(f"{module}.input_{p}") for p in ("scale", "zero_point", "global_scale")})

        def quantize(x: torch.Tensor) -> torch.Tensor:
            return forward_quantize(state, x, "input", args)
        if args.dynamic:
            return InputQuantization(quantize)
        if state.input_scale is None:
            raise ReaderRefused(f"{module}.input_scale is missing: the scheme quantizes its input statically")
        largest = FP8_LARGEST if args.type == "float" else 2 ** (args.num_bits - 1) - 1
        return InputQuantization(quantize, dynamic=False, largest=float(state.input_scale.float().max()) * largest)

    def _ignored(self, module: str) -> bool:
        from compressed_tensors.utils.match import match_name

        return any(match_name(module, target) for target in self.dequantizer.quant_config.ignore or [])

    def _scheme(self, module: str):
        from compressed_tensors.utils.match import match_name

        for scheme in self.schemes:
            if "Linear" in scheme.targets or any(match_name(module, t) for t in scheme.targets):
                return scheme
        raise ReaderRefused(f"{module} matches none of the quantization_config's targets")


def _rounded_to_nearest(weight: torch.Tensor, args) -> torch.Tensor:
    """``weight`` rounded to nearest under compressed-tensors' QuantizationArgs ``args`` and decoded: the scales
    from llm-compressor's min-max observer (what its data-free schemes use), the values from compressed-tensors'
    quantizer, so that no code of the workbench decides what a correct artifact holds."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = args.model_copy(deep=True)  # the observer writes its settings into the args it is given
    weight = weight.float().clone() if weight.dtype == torch.float32 else weight.float()  # rounded in place below
    qparams = _observer_class().load_from_registry("memoryless_minmax", base_name="weight", args=args)(weight).get_qparams()
    rows = weight.shape[0]
    # a block of rows at a time, into the float32 copy: the quantizer's float32 temporaries of a whole weight
    # (28672 x 8192 at the 70B width: ~1 GB each) set the read-back's peak
    cuts = all(v is None or _rows_per_entry(v, rows) is not None for v in qparams.values())
    step = _row_step(weight[0].numel()) if cuts else max(rows, 1)
    for start in range(0, rows, step):
        own = {k: _cut_rows(v, rows, start, start + step) for k, v in qparams.items()}
        weight[start:start + step] = fake_quantize(weight[start:start + step], own["scale"], own["zero_point"], args,
                                                   global_scale=own["global_scale"])
    return weight


def _row_step(values_per_row: int) -> int:
    """Rows decoded or rounded at a time: about ROUNDING_BLOCK values, a multiple of ROW_GROUP."""
    return max(ROW_GROUP, ROUNDING_BLOCK // max(values_per_row, 1) // ROW_GROUP * ROW_GROUP)


def _rows_per_entry(tensor: torch.Tensor, rows: int) -> int | None:
    """How many weight rows one entry along ``tensor``'s first dimension covers, as a format stores it: 0 for one
    value for all (a per-tensor scale, a global scale), 1 per row (channel and group scales), k per k rows (a
    zero point packed along the rows, a scale per block of rows; k dividing ROW_GROUP); None otherwise."""
    if tensor.dim() == 0 or tensor.numel() == 1:
        return 0
    return next((k for k in (2 ** i for i in range(ROW_GROUP.bit_length())) if -(-rows // k) == tensor.shape[0]), None)


def _cut_rows(tensor: torch.Tensor | None, rows: int, start: int, stop: int) -> torch.Tensor | None:
    """The part of ``tensor`` (one that _rows_per_entry places) that covers weight rows ``start:stop``."""
    k = None if tensor is None else _rows_per_entry(tensor, rows)
    return tensor if not k else tensor[start // k:-(-stop // k)]


def _rows_of_module(own: dict[str, torch.Tensor], rows: int, start: int, stop: int) -> dict[str, torch.Tensor]:
    """A module's tensors cut to weight rows ``start:stop`` (_cut_rows), with compressed-tensors' ``weight_shape``
    told the block's rows."""
    return {name: torch.tensor([min(stop, rows) - start, *tensor.tolist()[1:]], dtype=tensor.dtype)
            if name.endswith(".weight_shape") else _cut_rows(tensor, rows, start, stop) for name, tensor in own.items()}


@functools.cache
def _observer_class():
    """llm-compressor's Observer, imported once: its import logs to stdout (where --json's document goes) that it
    will compress on the CPU, which is not what it is asked here; its later messages go to stderr."""
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        from llmcompressor.observers import Observer
    library_logs_to_stderr("WARNING")
    return Observer


def _same(original: torch.Tensor | None, decoded: torch.Tensor) -> bool:
    """An untouched tensor passed through (embeddings, norms, ignored layers)."""
    return original is not None and original.dtype == decoded.dtype and original.data_ptr() == decoded.data_ptr()


def fp8_as_compressed_tensors(quant: dict) -> dict:
    """vLLM's per-tensor fp8 ``quantization_config`` described as compressed-tensors ``float-quantized``: the
    same tensor names and meanings (float8_e4m3fn weight, per-tensor weight_scale and input_scale)."""
    tensor_fp8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True}
    dynamic = quant.get("activation_scheme") == "dynamic"
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": list(quant.get("ignored_layers") or []),
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**tensor_fp8, "dynamic": False},
                                          "input_activations": {**tensor_fp8, "dynamic": dynamic}}}}


class Fp8BlockReader:
    """compressed-tensors' dequantizer of block-FP8 checkpoints, and its per-token-group FP8 activations."""

    def __init__(self, artifact: Path, quant: dict):
        from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

        self.name = _version("compressed-tensors")
        self.block = tuple(quant["weight_block_size"])
        ignore = quant.get("modules_to_not_convert") or quant.get("ignored_layers") or []
        self.dequantizer = FP8BlockDequantizer(ignore=ignore, weight_block_size=self.block, dtype=torch.float32)
        self.exact = True  # a scale per block from its absolute maximum: round-to-nearest, nothing chosen

    def rounded(self, module: str, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The source's ``weight`` rounded to nearest in FP8 with one scale per block of the config's size, decoded."""
        from compressed_tensors.quantization import QuantizationArgs

        args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=list(self.block), symmetric=True)
        return _rounded_to_nearest(weight, args)

    def weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decoded weights of the FP8 modules among ``tensors``, one module at a time (a refusal names it)."""
        modules = {n.rpartition(".")[0] for n, t in tensors.items() if n.endswith(".weight_scale_inv") or t.dtype == torch.float8_e4m3fn}
        decoded = {}
        for module in sorted(modules):
            own = {n: t for n, t in tensors.items() if n.rpartition(".")[0] == module}
            self._check_grid(module, own)
            try:
                decoded[module] = self.dequantizer.validate(own)[module + ".weight"].float()
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ReaderRefused(f"{module}: {self.name} cannot decode it: {str(exc).splitlines()[0]}") from None
        return decoded

    def _check_grid(self, module: str, own: dict[str, torch.Tensor]) -> None:
        """One scale per block of the config's size: the dequantizer's own message for another grid names shapes only."""
        weight, scales = own.get(module + ".weight"), own.get(module + ".weight_scale_inv")
        if weight is None or scales is None:
            return  # the dequantizer's refusal names what is missing
        want = tuple(-(-d // b) for d, b in zip(weight.shape, self.block))
        if tuple(scales.shape) != want:
            raise ReaderRefused(f"{module}.weight_scale_inv has shape {tuple(scales.shape)}; weight_block_size "
                                f"{list(self.block)} over the weight's {tuple(weight.shape)} needs {want}")

    def activations(self, module: str, tensors: dict[str, torch.Tensor]) -> InputQuantization:
        """Dynamic FP8 input quantization per token and group of the block's input width, by compressed-tensors;
        a last group short of it is zero-padded, as vLLM's kernels do."""
        from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        group = self.block[1]
        args = QuantizationArgs(num_bits=8, type="float", strategy="group", group_size=group, symmetric=True, dynamic=True)
        state = types.SimpleNamespace(quantization_status=QuantizationStatus.FROZEN)

        def quantized(x: torch.Tensor) -> torch.Tensor:  # a last group short of 128 zero-padded, as vLLM's kernels do
            width = x.shape[-1]
            padded = torch.nn.functional.pad(x, (0, -width % group))
            return forward_quantize(state, padded, "input", args)[..., :width]
        return InputQuantization(quantized)


class BitsAndBytesReader:
    """bitsandbytes' own decoding of its packed 4-bit weights and quant states."""

    def __init__(self, artifact: Path, quant: dict):
        self.name = _version("bitsandbytes")
        self.exact = True  # a scale per block from its absolute maximum, values to the nearest code

    def rounded(self, module: str, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``weight`` through bitsandbytes' own quantize_4bit with the written quant state's settings."""
        import bitsandbytes.functional as F

        prefix = module + ".weight."
        written = F.QuantState.from_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
                                         device=torch.device("cpu"))
        packed, state = F.quantize_4bit(weight.to(written.dtype), blocksize=written.blocksize,
                                        compress_statistics=written.nested, quant_type=written.quant_type)
        state.dtype = torch.float32
        return F.dequantize_4bit(packed, state)

    def weights(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decoded float32 weights by module name, for each packed weight among ``tensors`` that has a quant state
        (a refusal names the weight)."""
        import bitsandbytes.functional as F

        decoded = {}
        for name in tensors:
            if ".quant_state.bitsandbytes__" not in name:
                continue
            weight = name.split(".quant_state.")[0]
            parts = {k.removeprefix(weight + "."): v for k, v in tensors.items() if k.startswith(weight + ".")}
            try:
                state = F.QuantState.from_dict(parts, device=torch.device("cpu"))
                state.dtype = torch.float32
                decoded[weight.removesuffix(".weight")] = F.dequantize_4bit(tensors[weight], state)
            except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
                raise ReaderRefused(f"{weight}: {self.name} cannot decode it: {str(exc).splitlines()[0]}") from None
        return decoded

    def activations(self, module: str, tensors: dict[str, torch.Tensor]):
        """None: bitsandbytes' 4-bit Linear leaves its inputs unquantized."""
        return None  # bitsandbytes' 4-bit Linear computes with float activations


READERS = {"compressed-tensors": CompressedTensorsReader, "fp8": CompressedTensorsReader, "bitsandbytes": BitsAndBytesReader}


def reader_for(artifact: Path, config: dict):
    """The format's own reader of ``artifact``, or None when no reader is known for its format."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method not in READERS:
        return None
    if method == "fp8" and quant.get("weight_block_size"):
        return Fp8BlockReader(artifact, quant)
    if method == "fp8":
        return _fp8_reader(artifact, config)
    return READERS[method](artifact, quant)


def _fp8_reader(artifact: Path, config: dict) -> CompressedTensorsReader:
    """compressed-tensors pointed at vLLM's fp8 checkpoint: a folder holding only a config.json with the
    compressed-tensors description (the dequantizer reads the config alone; the tensors come from ours)."""
    import tempfile

    described = {**config, "quantization_config": fp8_as_compressed_tensors(config["quantization_config"])}
    with tempfile.TemporaryDirectory(prefix="workbench-readback-") as folder:
        Path(folder, "config.json").write_text(json.dumps(described))
        reader = CompressedTensorsReader(Path(folder), described["quantization_config"])
    reader.exact = True  # the workbench writes it by round-to-nearest from the weights' absolute maximum
    return reader


@torch.inference_mode()
def read_back(artifact: Path, source: Path, blocks: torch.Tensor) -> ReadBack | None:
    """``artifact`` read by its format's library against ``source`` on the token ``blocks``; None when no
    reader knows the format (a GGUF, a full-precision model, native GPTQ/AWQ files)."""
    checkpoint = Checkpoint(artifact)
    try:
        reader = reader_for(artifact, checkpoint.config)
    except ReaderRefused as exc:
        return ReadBack(_version("compressed-tensors"), quant_of(checkpoint.config).kind, refusal=str(exc))
    if reader is None:
        return None
    result = ReadBack(reader.name, quant_of(checkpoint.config).kind, exact=reader.exact)
    # computed in float32; the source layer's Linear weights held in the checkpoint's own dtype and made float32
    # a module per call (its whole float32 layer was the read-back's peak: 3.4 GB at the 70B width)
    stored = Checkpoint(source).dtype
    runner = LayerRunner(source, linear_storage=stored if stored.itemsize < COMPUTE_DTYPE.itemsize else None)
    try:
        result.modules += _outside_layers(runner, checkpoint, reader)
        streams = runner.streams(blocks)
        for i in range(runner.num_layers):
            with runner.layer(i) as layer:
                result.modules += _one_layer(runner, i, layer, checkpoint, reader, streams)
    except ReaderRefused as exc:
        result.refusal = str(exc)
    return result


def _module_kind(module: str) -> str:
    """A module's name within its layer: ``model.layers.3.mlp.gate_proj`` -> ``mlp.gate_proj``."""
    return re.sub(r"^.*?\.\d+\.", "", module)


def _tensors(checkpoint: Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    """The artifact's tensors; one the checkpoint reader refuses (NaN or Inf in it) is a refusal naming its module."""
    tensors = {}
    for name in names:
        try:
            tensors[name] = checkpoint.store.get(name)
        except BadInput as exc:
            raise ReaderRefused(f"{name.rpartition('.')[0]}: {exc}") from None
    return tensors


def _outside_layers(runner: LayerRunner, checkpoint: Checkpoint, reader) -> list[ModuleReading]:
    """The Linear modules outside the decoder layers (lm_head) through the reader, as compressed-tensors
    would match them on the model; one it decodes (quantized) is compared weight to weight with the source."""
    head = runner.layers_prefix + "."
    linears = {runner.checkpoint_name(n) for n, m in runner.model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.startswith(head)}
    names = [n for n in checkpoint.store.tensors if n.rpartition(".")[0] in linears]
    readings = []
    tensors = _tensors(checkpoint, names)
    for module, weight in reader.weights(tensors).items():
        source = runner.weights.get(module + ".weight").float()
        reading = _from_sums(module, *_sums(source.flatten(), weight.flatten()), role="weight")
        rounded = reader.rounded(module, source, tensors)
        _set_rounding(reading, _sums(source, rounded), _sums(rounded, weight))
        readings.append(reading)
    return readings


def _set_rounding(reading: ModuleReading, rounding_sums: list[float], gap_sums: list[float]) -> None:
    """``reading``'s rounding figures from the sums of (source, rounded) and of (rounded, decoded), both
    relative to the source's norm."""
    rounded = _from_sums(reading.module, *rounding_sums)
    reading.rounding, reading.rounding_gain = rounded.error, rounded.gain
    reading.from_rounding = (gap_sums[0] / max(rounding_sums[1], 1e-30)) ** 0.5


def _one_layer(runner: LayerRunner, index: int, layer, checkpoint: Checkpoint, reader, streams) -> list[ModuleReading]:
    """Decoder layer ``index`` as the source has it and as the reader decodes the artifact's (its other
    tensors, e.g. norms a smoothing folded scales into, from the artifact too), each run on the source's
    hidden states. Compared: the layer's update (output - input), which smoothing leaves unchanged, and
    each decoded module's output, to name the module when the layer is off. The decoded layer's routers give
    the source's routing, so that each expert is compared on the tokens the source sent it. ``streams`` move
    on with the source's output."""
    local, tensors, _, modules = _layer_read(runner, index, layer, checkpoint, reader, keep=False)
    # each module's decoded or rounded weight exists only while that module runs (a pre-hook makes it): the
    # whole decoded layer in float32 beside the source's was the read-back's peak (+0.9 GB at the 8B width)
    decoded = {m: partial(_decoded_weight, reader, m, tensors) for m in modules}
    layer_sums, module_sums, clipped = [0.0] * 3, {m: [0.0] * 3 for m in modules}, {}
    rounding_sums, gap_sums = [0.0] * 3, [0.0] * 3
    kv_scales = {n: tensors[local[n]] for n in local if n.endswith(("k_scale", "v_scale"))}  # by layer-local name
    kv_counts = {n: [0, 0] for n in kv_scales}
    prefix = runner.layer_prefix(index) + "."
    routers = [r.removeprefix(prefix) for r in experts.routers(runner.model) if r.startswith(prefix)]
    called = {}  # layer-local module names, in the order of their first call
    runs = []  # per stream: (its input, the source's update, the decoded layer's output, the source's routing)
    for s in streams:
        hidden = s.hidden
        with _module_outputs(layer, modules.values()) as expected, _module_outputs(layer, routers) as routing:
            runner.forward(layer, index, s)
        candidate = s.fork()
        candidate.hidden = hidden
        with _decoded_layer(layer, decoded, modules, local, tensors, reader, clipped), _module_outputs(layer, modules.values()) as got, \
                _module_outputs(layer, routers, replay=routing.outputs), \
                kvcache.seen(layer, partial(_count_past_kv_scales, kv_scales, kv_counts)):
            runner.forward(layer, index, candidate)
        update = s.hidden - hidden
        _add(layer_sums, _sums(update, candidate.hidden - hidden))
        called.update(dict.fromkeys(got.outputs))
        for module, name in modules.items():
            for e, g in zip(expected.outputs.get(name, []), got.outputs.get(name, []), strict=True):
                _add(module_sums[module], _sums(e, g))
        runs.append((s.fork(), hidden, update, candidate.hidden, routing.outputs))
    rounded = {m: partial(reader.rounded, m, layer.get_submodule(name).weight, tensors) for m, name in modules.items()}
    for by_rounding, hidden, update, candidate_hidden, routing_outputs in runs:
        by_rounding.hidden = hidden
        with _decoded_layer(layer, rounded, modules, local, tensors, reader, {}, own_tensors=False), \
                _module_outputs(layer, routers, replay=routing_outputs):
            runner.forward(layer, index, by_rounding)
        _add(rounding_sums, _sums(update, by_rounding.hidden - hidden))
        _add(gap_sums, _sums(by_rounding.hidden, candidate_hidden))
    readings = [_from_sums(f"{runner.layer_prefix(index)} (the layer's update)", *layer_sums, role="layer")]
    _set_rounding(readings[0], rounding_sums, gap_sums)
    unseen = [local[n] for n, (_, total) in kv_counts.items() if not total]
    if unseen:  # never a pass for a scale nothing was compared with
        raise ReaderRefused(f"{unseen[0]}: no held-out key or value reached it through the attention (not checked)")
    readings += [ModuleReading(local[n], 0.0, 1.0, past / total, role="kv") for n, (past, total) in kv_counts.items()]
    rank = {name: i for i, name in enumerate(called)}
    modules_read = [_from_sums(m, *module_sums[m]) for m in sorted(module_sums, key=lambda m: rank.get(modules[m], len(rank)))
                    if module_sums[m][1] > 0]  # in call order; an expert no token reached: none
    for m in modules_read:
        past, total = clipped.get(m.module, (0, 0))
        m.clipped = past / total if total else 0.0
    return readings + modules_read


def _layer_read(runner: LayerRunner, index: int, layer, checkpoint: Checkpoint, reader,
                keep: bool = True) -> tuple[dict, dict, dict, dict]:
    """Decoder layer ``index`` of the artifact: (checkpoint name by layer-local name, its tensors by checkpoint
    name, the reader's decoded weights by module's checkpoint name (empty without ``keep``), each such module's
    layer-local name). Every module is decoded here, so that a refusal or a wrong shape is found before anything
    runs; without ``keep`` one module's decoded weight at a time. With ``keep`` each decoded weight is kept in
    the runner's dtype (an engine's kernel dequantizes to it) and the source's own parameters of that module are
    dropped as it is decoded (the caller runs the decoded module: its other parameters come from the artifact)."""
    prefix = runner.layer_prefix(index) + "."
    local = {runner.module_name(n).removeprefix(prefix): n for n in checkpoint.store.tensors if n.startswith(prefix)}
    linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    _check_owned(layer, local)
    tensors = _tensors(checkpoint, list(local.values()))
    decoded, modules = {}, {}
    for group in _by_module(runner, prefix, linears, tensors).values():
        for module, weight in reader.weights(group).items():
            modules[module] = runner.module_name(module + ".weight").removesuffix(".weight").removeprefix(prefix)
            _check_shape(layer, modules[module], weight, local, reader)
            if keep:
                decoded[module] = weight.to(runner.dtype)
                runner.unload(layer.get_submodule(modules[module]))
    return local, tensors, decoded, modules


def _by_module(runner: LayerRunner, prefix: str, linears: set[str], tensors: dict) -> dict[str, dict]:
    """The layer's tensors that belong to its Linear modules (weights and their quantization parameters,
    bitsandbytes' dotted ``weight.quant_state...`` too), grouped by that module's layer-local name."""
    groups: dict[str, dict] = {}
    for name, tensor in tensors.items():
        parts = runner.module_name(name).removeprefix(prefix).split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in linears), None)
        if owner is not None:
            groups.setdefault(owner, {})[name] = tensor
    return groups


def _check_shape(layer, name: str, weight: torch.Tensor, local: dict, reader) -> None:
    """A decoded weight must have its source module's shape."""
    expected = tuple(layer.get_submodule(name).weight.shape)
    if tuple(weight.shape) != expected:
        raise ReaderRefused(f"{local.get(name + '.weight', name)}: {reader.name} reads shape {tuple(weight.shape)}, "
                            f"the source's is {expected}")


def _decoded_weight(reader, module: str, tensors: dict) -> torch.Tensor:
    """``module``'s weight as the reader decodes it from the layer's ``tensors``."""
    own = {n: t for n, t in tensors.items() if n.startswith(module + ".")}
    return reader.weights(own)[module]


def _check_owned(layer, local: dict[str, str]) -> None:
    """Refuse a tensor no module of the source's layer has a place for (an expert written under another
    projection name): read back or evaluated, it would leave that module the source's, a pass nobody checked.
    A tensor belongs to the deepest module its name starts with, as a parameter of it or of its weight
    (bitsandbytes' ``weight.quant_state...``)."""
    modules = {n for n, _ in layer.named_modules() if n}
    for name, checkpoint_name in local.items():
        parts = name.split(".")
        owner = max((i for i in range(1, len(parts)) if ".".join(parts[:i]) in modules), default=0)
        rest = parts[owner:]
        if len(rest) > 1 and rest[0] != "weight":
            raise ReaderRefused(f"{checkpoint_name}: the source has no module {checkpoint_name.rpartition('.')[0]} for "
                                "this tensor (written under another name?)")


@torch.inference_mode()
def decoded_final_hidden(artifact: Path, runner: LayerRunner, blocks: torch.Tensor) -> torch.Tensor:
    """The artifact as its format's library decodes it, run on ``blocks`` layer by layer through ``runner``
    (the source's, for what the artifact leaves unquantized: embeddings, final norm; in its dtype): decoded weights, its
    other layer tensors, every input quantization its scheme names (static ones with their written scales)
    and its KV-cache scales applied. Returns the final normed hidden states [positions, hidden]; a reader's
    refusal is an ArtifactFailed naming the tensor."""
    checkpoint = Checkpoint(artifact)
    try:
        reader = reader_for(artifact, checkpoint.config)
        if reader is None:
            raise ReaderRefused(f"no reader knows {artifact}'s quantization_config")
        streams = runner.streams(blocks)
        for i in range(runner.num_layers):
            with runner.layer(i) as layer:
                local, tensors, decoded, modules = _layer_read(runner, i, layer, checkpoint, reader)
                kv = {a: tuple(tensors[local[f"{a}.{k}_scale"]] for k in "kv") for a in kvcache.attention_modules(layer)
                      if f"{a}.k_scale" in local and f"{a}.v_scale" in local}
                with _decoded_layer(layer, decoded, modules, local, tensors, reader, {}, static=True), kvcache.applied(layer, kv):
                    for s in streams:
                        runner.forward(layer, i, s)
    except ReaderRefused as exc:
        raise ArtifactFailed(f"the written artifact cannot be evaluated: {exc}") from None
    return runner.normed(torch.cat([s.hidden for s in streams]))


def _count_past_kv_scales(kv_scales: dict, counts: dict, attention: str, key: torch.Tensor, value: torch.Tensor) -> None:
    """Add to ``counts[<attention>.k_scale]`` (and v) the keys (values) past the largest value the written scale
    represents in FP8; a scale of 0 represents nothing."""
    for kind, x in (("k_scale", key), ("v_scale", value)):
        name = f"{attention}.{kind}"
        if name in kv_scales:
            largest = float(kv_scales[name].float()) * kvcache.FP8_MAX
            counts[name][0] += int((x.float().abs() > largest).sum())
            counts[name][1] += x.numel()


class _module_outputs:
    """While open, the outputs of each named submodule of ``layer``, one per call (a routed expert is called
    for the tokens routed to it, or not at all); with ``replay`` (outputs by name, as recorded), each call
    returns the recorded output of the same call instead of its own."""

    def __init__(self, layer, names, replay: dict | None = None):
        self.layer, self.names, self.outputs, self.handles, self.replay = layer, list(names), {}, [], replay

    def __enter__(self):
        for name in self.names:
            def keep(_m, _args, out, name=name):
                calls = self.outputs.setdefault(name, [])
                calls.append(out if self.replay is None else self.replay[name][len(calls)])
                return calls[-1] if self.replay is not None else None
            self.handles.append(self.layer.get_submodule(name).register_forward_hook(keep))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def _decoded_layer(layer, decoded: dict, modules: dict, local: dict, tensors: dict, reader, clipped: dict,
                   static: bool = False, own_tensors: bool = True):
    """``layer`` with the ``decoded`` weights, the reader's dynamic input quantization (static too, with
    ``static``), and the artifact's other parameters (norms, biases; with ``own_tensors``) in place of the
    source's; the source's back on exit. A decoded weight given as a function is made by it each time its
    module runs, and dropped after (_per_call). ``clipped[module]`` counts [inputs past a static scale's range,
    inputs]."""
    saved, handles = [], []
    params = dict(layer.named_parameters())
    replaced = {modules[m] + ".weight": w for m, w in decoded.items() if not callable(w)}
    made_per_call = {modules[m] + ".weight" for m, w in decoded.items() if callable(w)}
    if own_tensors:
        replaced.update({n: tensors[local[n]].float() for n in params if n in local and n not in replaced.keys() | made_per_call})
    try:
        for name, value in replaced.items():
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            if tuple(value.shape) != tuple(params[name].shape):
                raise ReaderRefused(f"{local.get(name, name)}: {reader.name} reads shape {tuple(value.shape)}, "
                                    f"the source's is {tuple(params[name].shape)}")
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, torch.nn.Parameter(value.to(params[name].dtype), requires_grad=False))
        for m, make in decoded.items():
            if callable(make):
                handles += _per_call(layer.get_submodule(modules[m]), make)
        for module, name in modules.items():
            handles += _input_hooks(layer.get_submodule(name), reader.activations(module, tensors),
                                    clipped.setdefault(module, [0, 0]), static)
        yield
    finally:
        for h in handles:
            h.remove()
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def _per_call(module, make) -> list:
    """Hooks that give ``module`` the weight ``make()`` returns (float32, the read-back's compute dtype) for each
    call, and its own back after it. The swap comes before the runner's own per-call upcast of a weight held
    narrower (which then has nothing to do), and its undoing after the runner's."""
    own = []

    def swap_in(m, _args):
        own.append(m.weight)
        m.weight = torch.nn.Parameter(make(), requires_grad=False)

    def swap_back(m, _args, _out):
        m.weight = own.pop()
    return [module.register_forward_pre_hook(swap_in, prepend=True), module.register_forward_hook(swap_back)]


def _input_hooks(module, quantization: InputQuantization | None, counts: list[int], static: bool = False) -> list:
    """Hooks on ``module`` that quantize its input (dynamic ones; static ones too with ``static``) or else
    count the inputs past a static scale's range into ``counts``."""
    if quantization is None:
        return []
    if quantization.dynamic or static:
        q = quantization.quantize
        return [module.register_forward_pre_hook(lambda _m, args: (q(args[0].float()).to(args[0].dtype), *args[1:]))]

    def count(_m, args):
        counts[0] += int((args[0].float().abs() > quantization.largest).sum())
        counts[1] += args[0].numel()
    return [module.register_forward_pre_hook(count)]


def _sums(expected: torch.Tensor, got: torch.Tensor) -> list[float]:
    expected, got = expected.float(), got.float()
    return [float(((got - expected) ** 2).sum()), float((expected ** 2).sum()), float((got * expected).sum())]


def _add(acc: list[float], values: list[float]) -> None:
    for i, v in enumerate(values):
        acc[i] += v


def _from_sums(module: str, squared_error: float, squared: float, dot: float, role: str = "module") -> ModuleReading:
    squared = max(squared, 1e-30)
    error, gain = (squared_error / squared) ** 0.5, dot / squared
    if error != error:  # NaN: the reader's output is not a number
        error, gain = float("inf"), float("nan")
    return ModuleReading(module, error, gain, role=role)
