"""The one reading of a config's quantization_config: the method as the TP rules and the engines' kernels name
it, and the kind whose tolerances apply (full, fp8, int8, int4, fp4). Preflight, verify's gates, the read-back
and inspect all ask here, so no two of them can call one artifact different things."""

from __future__ import annotations

from dataclasses import dataclass

# (weight number type, bits) -> kind
KIND_BY_WEIGHTS = {("float", 8): "fp8", ("int", 8): "int8", ("float", 4): "fp4", ("int", 4): "int4"}
LOOSEST = "int4"  # the kind of a method no reader here knows: the widest quantized tolerances


@dataclass(frozen=True)
class Quant:
    """What a config's quantization_config says the weights are: the method, the kind whose tolerances apply,
    and the group or block size the TP rules check."""
    method: str | None = None  # normalised: "gptq", "awq", "fp8", "compressed-tensors-wna16", ... (None: full precision)
    kind: str = "full"  # which tolerances apply
    group_size: int | None = None  # weight quantization group along the input dimension
    block: tuple[int, int] | None = None  # FP8 block [block_n (out), block_k (in)]


def _weight_kind(kind: str, bits) -> str:
    return KIND_BY_WEIGHTS.get((kind, bits), LOOSEST)


def _bits_field(qc: dict) -> Quant:
    """GPTQ and AWQ: integer weights of qc["bits"] bits."""
    group = qc.get("group_size") if (qc.get("group_size") or 0) > 0 else None
    return Quant(qc["quant_method"], _weight_kind("int", qc.get("bits", 4)), group)


def _bitsandbytes(qc: dict) -> Quant:
    eight = qc.get("load_in_8bit") and not qc.get("load_in_4bit")
    return Quant("bitsandbytes", "int8" if eight else "int4")


def _fp8(qc: dict) -> Quant:
    block = qc.get("weight_block_size")
    return Quant("fp8", "fp8", block=tuple(block) if block else None)


def _compressed_tensors(qc: dict) -> Quant:
    """The lowest-bit config group decides the kind; integer weights without activation quantization are
    the WNA16 kernels' method, a block structure the block-FP8 one."""
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    lowest = min(weights, key=lambda w: w.get("num_bits", 16), default={})
    kind = _weight_kind(lowest.get("type", "int"), lowest.get("num_bits"))
    for group, w in zip(groups, weights):
        if w.get("type") == "int" and w.get("num_bits") in (4, 8) and not group.get("input_activations"):
            return Quant("compressed-tensors-wna16", kind, w.get("group_size"))
        if w.get("block_structure"):
            return Quant("fp8", kind, block=tuple(w["block_structure"]))
    return Quant("compressed-tensors", kind)


READERS = {"fp8": _fp8, "gptq": _bits_field, "awq": _bits_field, "bitsandbytes": _bitsandbytes,
           "compressed-tensors": _compressed_tensors}


def quant_of(config: dict) -> Quant:
    """What ``config`` (a config.json's contents; a multimodal one's text_config is not consulted: the
    quantization_config sits at the top) says its weights are."""
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method is None:
        return Quant()
    if method in READERS:
        return READERS[method](qc)
    block = qc.get("weight_block_size")
    group = qc.get("group_size") if (qc.get("group_size") or 0) > 0 else None
    return Quant(method, LOOSEST, group, tuple(block) if block else None)
