"""Quantization in one walk through the layer runner, for the formats written by the workbench's own code
(a codec, as the ``Codec`` protocol says: fp8.Codec, bnb.Codec): per decoder layer, calibrate its input
scales on the calibration samples (when the codec needs them), run the source on the evaluation text, write
the layer's quantized tensors, then run what exactly was written (the codec's emulation) on the same text.
Peak memory: one layer, its quantized copy, the hidden states; the report keeps per-position statistics
only (quality.PairStats), never the logits."""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

import torch
from torch import nn

from .. import kvcache
from ..checkpoint import Checkpoint, PlannedTensor, StreamedWriter, plan_shards
from ..errors import BadInput
from ..quality import compare_final_hidden
from ..runner import LayerRunner
from . import fp8


class Codec(Protocol):
    """A format the workbench writes itself, as the walk uses it."""

    calibrates: bool  # whether it needs the calibration samples (each target's input amax)
    writes_experts: bool  # whether it quantizes the experts of a mixture-of-experts model
    extra_layer_bytes: float  # memory per parameter of a layer beyond the layer itself while it is written

    def planned(self, name: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
        """The tensors written for the target weight ``name`` of ``shape``, with their dtypes and shapes."""

    def quantize(self, name: str, weight: torch.Tensor, amax: float, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], object]:
        """(the tensors to write for the weight ``name``, by name; the record of what was written that
        ``emulated`` takes), given the layer's weight, its input amax and the checkpoint's dtype of it."""

    def emulated(self, layer: nn.Module, written: dict[str, object]) -> contextlib.AbstractContextManager:
        """A context in which ``layer`` computes with what was written (the records by module name) and
        after which it is as before."""

    def quantization_config(self, ignored: list[str], compute_dtype: str) -> dict:
        """config.json's ``quantization_config``, given the unquantized layers' names and the compute dtype."""


def layer_of(runner: LayerRunner, name: str) -> int | None:
    """The decoder layer a checkpoint tensor belongs to, or None (embeddings, final norm, lm_head)."""
    head = runner.layers_prefix + "."
    if not name.startswith(head):
        return None
    index = name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def plan(source: Checkpoint, runner: LayerRunner, targets: list[str], codec: Codec,
         kv_cache: bool = False) -> tuple[list[str], dict[int, list[str]], list[PlannedTensor]]:
    """Write order (tensors outside the layers first, then layer by layer, each layer's KV-cache scales after
    its tensors) and the planned tensors."""
    weights = target_weights(runner, targets)
    outside, by_layer = [], {}
    for file in source.weight_files:
        for name in source.store.names_in(file):
            index = layer_of(runner, name)
            (outside if index is None else by_layer.setdefault(index, [])).append(name)
    planned = [PlannedTensor(n, source.store.tensors[n].dtype, source.store.tensors[n].shape) for n in outside]
    for i in sorted(by_layer):
        for name in by_layer[i]:
            info = source.store.tensors[name]
            planned += codec.planned(name, info.shape) if name in weights else [PlannedTensor(name, info.dtype, info.shape)]
        if kv_cache and not attention_names(runner, i):
            raise BadInput(f"--kv-cache: {runner.layer_prefix(i)} has no attention module with k_proj or qkv_proj to "
                           "write KV-cache scales for")
        planned += kvcache.planned(attention_names(runner, i)) if kv_cache else []
    return outside, by_layer, planned


def attention_names(runner: LayerRunner, index: int) -> list[str]:
    """The checkpoint names of decoder layer ``index``'s attention modules."""
    prefix = runner.layer_prefix(index)
    return [runner.checkpoint_name(f"{prefix}.{n}") for n in kvcache.attention_modules(runner.layers[index])]


def target_weights(runner: LayerRunner, targets: list[str]) -> set[str]:
    """The checkpoint names of the target modules' weights."""
    return {runner.checkpoint_name(t) + ".weight" for t in targets}


def check_targets(runner: LayerRunner, targets: list[str]) -> None:
    """Refuse target modules outside the decoder layers (embeddings, lm_head): the workbench's formats keep them
    unquantized."""
    outside = [t for t in targets if layer_of(runner, t + ".weight") is None]
    if outside:
        raise BadInput(f"{outside[0]} is outside the decoder layers: the workbench's formats keep embeddings and "
                       "lm_head unquantized; add it to the ignore list")


@torch.inference_mode()
def quantize_layers(runner: LayerRunner, source: Checkpoint, targets: list[str], codec: Codec, samples: torch.Tensor | None,
                    blocks: torch.Tensor, folder, on_layer=None, kv_cache: bool = False) -> tuple[dict[str, str], dict, dict[str, float]]:
    """Write the quantized checkpoint's weights (and, with ``kv_cache``, each layer's FP8 KV-cache scales) into
    ``folder``; returns (sha256 per file, quality figures of the emulated artifact against the source on
    ``blocks``, seconds per phase)."""
    check_targets(runner, targets)
    outside, by_layer, planned = plan(source, runner, targets, codec, kv_cache)
    walk = _Walk(runner, source, codec, StreamedWriter(folder, plan_shards(planned, source.largest_file_bytes)),
                 target_weights(runner, targets), kv_cache)
    for name in outside:
        walk.writer.copy(source.store, name)
    with walk.clock("calibration"):
        calibration = runner.streams(samples) if samples is not None and (codec.calibrates or kv_cache) else []
    with walk.clock("source_eval"):
        reference = runner.streams(blocks)
        candidate = [s.fork() for s in reference]
    for i in range(runner.num_layers):
        local = [t.removeprefix(runner.layer_prefix(i) + ".") for t in targets if t.startswith(runner.layer_prefix(i) + ".")]
        walk.layer(i, local, by_layer.get(i, []), calibration, reference, candidate)
        if on_layer:
            on_layer(i + 1, runner.num_layers)
    with walk.clock("head"):
        final = [runner.normed(torch.cat([s.hidden for s in streams])) for streams in (reference, candidate)]
        quality = compare_final_hidden(runner, *final, blocks)
    if walk.unrouted:
        quality["experts_never_routed"] = walk.unrouted  # in calibration; given their layer's input scale
    return walk.writer.sha256, quality, walk.phases


class _Walk:
    """One quantization walk's state: what writes, what it has timed, the experts no calibration token reached."""

    def __init__(self, runner: LayerRunner, source: Checkpoint, codec: Codec, writer: StreamedWriter, weights: set[str],
                 kv_cache: bool):
        self.runner, self.source, self.codec, self.writer, self.weights, self.kv_cache = runner, source, codec, writer, weights, kv_cache
        self.phases = dict.fromkeys(("read", "calibration", "source_eval", "write", "emulated_eval", "head"), 0.0)
        self.clock = Clock(self.phases)
        self.unrouted = 0

    def layer(self, i: int, local: list[str], names: list[str], calibration: list, reference: list, candidate: list) -> None:
        """Decoder layer ``i``: calibrated on ``calibration``, the source run on ``reference``, written, and what
        was written run on ``candidate`` (the streams move on to the next layer)."""
        runner, prefix = self.runner, self.runner.layer_prefix(i) + "."
        loading = time.perf_counter()
        with runner.layer(i) as layer:
            self.phases["read"] += time.perf_counter() - loading
            kv_seen = kvcache.observed(layer) if self.kv_cache else contextlib.nullcontext({})
            with self.clock("calibration"), fp8.input_amax(layer, local) as amax, kv_seen as kv_amax:
                for s in calibration:
                    runner.forward(layer, i, s)
            with self.clock("source_eval"):
                for s in reference:
                    runner.forward(layer, i, s)
            self.unrouted += fp8.fill_unrouted(amax) if calibration else 0
            with self.clock("write"):
                written = _write_layer(runner, layer, names, prefix, self.weights, amax, self.codec, self.source, self.writer)
                kv_scales = self._write_kv_scales(i, kv_amax)
            kv_read = kvcache.applied(layer, kv_scales) if self.kv_cache else contextlib.nullcontext()
            with self.clock("emulated_eval"), self.codec.emulated(layer, written), kv_read:
                for s in candidate:
                    runner.forward(layer, i, s)

    def _write_kv_scales(self, i: int, kv_amax: dict[str, list[float]]) -> dict:
        """Each attention module's (k_scale, v_scale), written under its checkpoint name, by its name in the layer."""
        written = {}
        for local, checkpoint_name in zip(kv_amax, attention_names(self.runner, i)):
            if not all(kv_amax[local]):
                raise BadInput(f"{checkpoint_name}: the calibration samples reached no keys or values of it through "
                               "transformers' sdpa/eager attention; no KV-cache scale can be calibrated")
            written[local] = kvcache.scales(kv_amax[local])
            for kind, scale in zip("kv", written[local]):
                self.writer.write(f"{checkpoint_name}.{kind}_scale", scale)
        return written


class Clock:
    """Seconds per phase: ``with clock(name):`` adds the block's time to ``phases[name]``."""

    def __init__(self, phases: dict[str, float]):
        self.phases = phases

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] += time.perf_counter() - t0


def _write_layer(runner: LayerRunner, layer, names: list[str], prefix: str, weights: set[str], amax: dict[str, float],
                 codec: Codec, source: Checkpoint, writer: StreamedWriter) -> dict:
    """Write one layer's tensors in plan order: targets through the codec (given the layer's weight and the
    checkpoint's dtype of it), the rest copied. Returns the codec's record of each target, by module name."""
    written = {}
    for name in names:
        if name not in weights:
            writer.copy(source.store, name)
            continue
        module = runner.module_name(name).removeprefix(prefix).removesuffix(".weight")
        weight = layer.get_submodule(module).weight
        tensors, written[module] = codec.quantize(name, weight, amax[module], source.store.tensors[name].dtype)
        for tensor_name, tensor in tensors.items():
            writer.write(tensor_name, tensor)
    return written
