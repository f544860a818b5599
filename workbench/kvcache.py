"""FP8 KV-cache scales, calibrated in the quantize walk and checked by the read-back: per decoder layer, ``<attention>.k_scale`` and
``v_scale`` (float32 scalars) = the largest |key| and |value| the layer's attention sees on the calibration
samples / 448, keys taken after RoPE and q/k norms, as the engine stores them. vLLM reads them under these
names (``self_attn.k_scale`` -> its ``attn.k_scale``) when served with ``--kv-cache-dtype fp8``; per-head
scales are not written: vLLM's "fp8" format takes one scale per tensor, and its CPU attention collapses
compressed-tensors' per-head ones to their max.

The keys and values are reached through transformers' attention-function table (the one call that gets
them after RoPE): while a context is open, its ``sdpa`` and ``eager`` entries record (or round-trip through
FP8 with the written scales) what the model passes them, then call the model's own function."""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from .checkpoint import PlannedTensor

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448

# config.json's description of the scales, in compressed-tensors' words (vLLM's "fp8" format ignores it)
SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def attention_modules(layer: nn.Module) -> list[str]:
    """The attention modules of a decoder layer (their names in it): the modules holding the K projection."""
    return [name for name, m in layer.named_modules() if hasattr(m, "k_proj") or hasattr(m, "qkv_proj")]


def planned(checkpoint_names: list[str]) -> list[PlannedTensor]:
    """The output tensors of the KV-cache scales: a float32 scalar ``k_scale`` and ``v_scale`` for each
    attention module named (checkpoint names)."""
    return [PlannedTensor(f"{name}.{kind}_scale", torch.float32, ()) for name in checkpoint_names for kind in "kv"]


@contextlib.contextmanager
def _through_attention(on_kv):
    """While open, every sdpa/eager attention call passes its keys and values through ``on_kv(module, k, v)``."""
    from transformers.modeling_utils import AttentionInterface

    table = AttentionInterface._global_mapping
    saved = {name: table.get(name) for name in ("sdpa", "eager")}

    def wrapped(name):
        def attention(module, query, key, value, *args, **kwargs):
            key, value = on_kv(module, key, value)
            inner = saved[name] or sys.modules[type(module).__module__].eager_attention_forward
            return inner(module, query, key, value, *args, **kwargs)
        return attention

    table.update(sdpa=wrapped("sdpa"), eager=wrapped("eager"))
    try:
        yield
    finally:
        for name, fn in saved.items():
            if fn is None:
                table.pop(name, None)
            else:
                table[name] = fn


@contextlib.contextmanager
def seen(layer: nn.Module, on_kv):
    """While open, ``on_kv(name, key, value)`` sees the keys and values of each call of ``layer``'s attention
    modules (by their names in the layer)."""
    names = {id(layer.get_submodule(n)): n for n in attention_modules(layer)}

    def look(module, key, value):
        if id(module) in names:
            on_kv(names[id(module)], key, value)
        return key, value

    with _through_attention(look):
        yield


@contextlib.contextmanager
def observed(layer: nn.Module):
    """While open, the largest |key| and |value| each attention module of ``layer`` sees: {name: [k, v]}."""
    amax = {n: [0.0, 0.0] for n in attention_modules(layer)}

    def record(name, key, value):
        amax[name][0] = max(amax[name][0], float(key.abs().amax()))
        amax[name][1] = max(amax[name][1], float(value.abs().amax()))

    with seen(layer, record):
        yield amax


def scales(amax: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_scale, v_scale) for the largest |key| and |value|."""
    k, v = (torch.tensor(max(a, 1e-12) / FP8_MAX, dtype=torch.float32) for a in amax)
    return k, v


def _round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an FP8 cache gives back for ``x`` stored with ``scale``."""
    s = scale.float()
    return ((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s).to(x.dtype)


@contextlib.contextmanager
def applied(layer: nn.Module, written: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """While open, each attention module of ``layer`` named in ``written`` (name -> (k_scale, v_scale)) reads
    its keys and values back from an FP8 cache."""
    by_id = {id(layer.get_submodule(n)): s for n, s in written.items()}

    def cached(module, key, value):
        if id(module) not in by_id:
            return key, value
        k_scale, v_scale = by_id[id(module)]
        return _round_trip(key, k_scale), _round_trip(value, v_scale)

    with _through_attention(cached):
        yield
