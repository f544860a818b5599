"""A peft LoRA adapter against its base: every check of the pair, the merge plan (which base tensors change,
by which deltas, in which dtype) and each merged tensor, computed from the adapter file exactly as peft's
unmerged forward pass applies it, in float32, one base tensor at a time. Shared by `workbench merge` (which
writes the plan out) and the layer runner (which runs a base with an adapter folded in, as the reference).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import (
    LAYER_NAME,
    CHAT_TEMPLATE_FILES,
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    Checkpoint,
    TensorStore,
    config_dtypes,
    read_json,
    side_files,
)
from .errors import BadInput
from .options import BASE_QUANTS, MERGE_DTYPES
from .experts import renamer
from .families import check_handled, expert_count, expert_intermediate, family_of
from .hub import output_stem
from .bnb4 import Bnb4bit
from .safety import check_remote_code

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
OUTPUT_EMBEDDING = "lm_head.weight"
# peft's ParamWrapper on a stacked experts module, nested once per further adapted parameter
STACKED_EXPERTS = re.compile(r"\.experts(\.base_layer)*$")

DTYPES = dict(zip(MERGE_DTYPES[1:], (torch.bfloat16, torch.float16, torch.float32)))  # the merge's --dtype names
# An adapter whose recorded base name says 4-bit bitsandbytes was trained QLoRA (Unsloth's "-bnb-4bit"
# bases are NF4 with double quantization).
FOUR_BIT_BASE = re.compile(r"bnb[-_]?4bit|4bit", re.IGNORECASE)


@dataclass(frozen=True)
class BaseQuant(Bnb4bit):
    """The base as QLoRA training saw it: every Linear weight of the decoder layers quantized to 4 bits by
    bitsandbytes, as transformers' BitsAndBytesConfig loads it (block size 64; double quantization of the
    block scales optional; lm_head and embeddings stay unquantized)."""

    def covers(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether QLoRA training quantized this tensor: a 2-D ".weight" inside a decoder layer."""
        return len(shape) == 2 and name.endswith(".weight") and LAYER_NAME.match(name) is not None


# Adapter tensor suffix -> (role, layer kind). Anything else in the adapter is a whole replacement tensor
# (modules_to_save, or the embedding copies peft saves beside embedding LoRA).
LORA_SUFFIXES = {
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
    ".lora_magnitude_vector": ("magnitude", None),
}
# Wrapper infixes in whole-tensor keys -> whether the tensor is what peft's forward pass uses. With resized
# embeddings peft saves the trained copy twice (".modules_to_save." and plain) and the wrapped original.
WRAPPER_INFIXES = {".modules_to_save.": True, ".base_layer.": True, ".original_module.": False}

# peft_type values this merge handles, and LoRA options it does not (with their "off" values).
SUPPORTED_PEFT_TYPES = ("LORA",)
UNSUPPORTED_LORA_OPTIONS = {
    "lora_bias": False,
    "use_qalora": False,
    "use_bdlora": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "ensure_weight_tying": False,
    "arrow_config": None,
}


@dataclass
class Delta:
    """One LoRA (or DoRA) update to add to a base tensor."""

    module: str
    kind: str  # "linear" | "embedding"
    a: str
    b: str
    scale: float
    fan_in_fan_out: bool
    magnitude: str | None = None
    # LoRA on stacked MoE experts (peft's target_parameters): this expert's share of the factors, and the
    # rows of the product that are this checkpoint tensor (gate and up are one stacked parameter)
    expert: int | None = None
    experts: int = 1
    rows: tuple[int, int] | None = None

    def factors(self, adapter: TensorStore) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in float32, as this tensor's update uses them. peft's ParamWrapper stores A as
        [experts * r, in] (expert-major) and B as [out, r * experts] (expert-minor)."""
        a, b = adapter.get(self.a).float(), adapter.get(self.b).float()
        if self.expert is not None:
            a = a.view(self.experts, -1, a.shape[1])[self.expert]
            b = b.view(b.shape[0], -1, self.experts)[:, :, self.expert]
        if self.rows is not None:
            b = b[self.rows[0]:self.rows[1]]
        return a, b

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is the transpose of the LoRA product B @ A: embedding LoRA
        (A [r, vocab], B [dim, r], weight [vocab, dim]) and Conv1D layers (fan_in_fan_out, weight [in, out])."""
        return self.kind == "embedding" or self.fan_in_fan_out

    def add_to(self, weight: torch.Tensor, adapter: TensorStore) -> None:
        """weight += scale * B @ A (or its transpose), in place, in the weight's dtype (float32 here)."""
        a, b = self.factors(adapter)
        if self.transposed:
            weight.addmm_(a.T, b.T, alpha=self.scale)
        else:
            weight.addmm_(b, a, alpha=self.scale)


@dataclass
class OutputTensor:
    """One tensor of the merged checkpoint: the base (or adapter) tensor it starts from, and the LoRA update
    added to it, if any."""
    name: str
    source: str  # tensor name in the base, or in the adapter when from_adapter
    from_adapter: bool = False
    delta: Delta | None = None


@dataclass
class MergePlan:
    """Everything a merge writes, decided (plan_merge) before any output exists: the output tensors in order and
    their dtype, the config and side files, the warnings, and the QLoRA base quantization to reproduce (None:
    the full-precision base)."""
    base: Checkpoint
    adapter_dir: Path
    adapter: TensorStore
    adapter_config: dict
    dtype: torch.dtype
    outputs: list[OutputTensor]
    config: dict
    side_files: list[tuple[Path, str]]
    warnings: list[str] = field(default_factory=list)
    base_quant: BaseQuant | None = None

    def requantized(self, o: "OutputTensor") -> bool:
        """Whether this output's base weight goes through the QLoRA round trip first."""
        if self.base_quant is None or o.from_adapter:
            return False
        return self.base_quant.covers(o.source, self.base.store.tensors[o.source].shape)

    @property
    def deltas(self) -> list[Delta]:
        """The LoRA updates the merge adds, one per adapted module, in output order."""
        return [o.delta for o in self.outputs if o.delta is not None]




def load_adapter_config(adapter_dir: Path) -> dict:
    """The adapter folder's adapter_config.json, checked: a LoRA adapter with no option the merge does not
    handle, numeric ``r`` and ``lora_alpha``, and no request to run its own code (unless trusted)."""
    if not adapter_dir.is_dir():
        raise BadInput(f"adapter folder not found: {adapter_dir}")
    cfg = read_json(adapter_dir / ADAPTER_CONFIG, "adapter_config.json")
    check_remote_code(adapter_dir)
    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise BadInput(f"unsupported adapter type {peft_type!r}: workbench merges LoRA/rsLoRA/DoRA adapters only")
    for key, off in UNSUPPORTED_LORA_OPTIONS.items():
        if cfg.get(key, off) not in (off, None, False, [], {}):
            raise BadInput(f"unsupported LoRA option {key}={cfg[key]!r} in {adapter_dir / ADAPTER_CONFIG}")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if not isinstance(cfg.get(key), kind) or isinstance(cfg.get(key), bool):
            raise BadInput(f"adapter_config.json: {key} must be a number, got {cfg.get(key)!r}")
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern/alpha_pattern lookup: first key matching a dotted suffix of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targeted(cfg: dict, module: str) -> bool:
    """peft's target_modules / exclude_modules / layers_to_transform matching for one module name."""
    def matches(spec) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):
            return re.fullmatch(spec, module) is not None
        return any(module == t or module.endswith("." + t) for t in spec)

    target = cfg.get("target_modules")
    if target in (None, "all-linear") or not matches(target) or matches(cfg.get("exclude_modules")):
        return False
    layers = cfg.get("layers_to_transform")
    if layers is None:
        return True
    layers = [layers] if isinstance(layers, int) else layers
    patterns = cfg.get("layers_pattern") or [r"[^.]*"]
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for p in patterns:
        m = re.match(rf".*\.{p}\.(\d+)\.", module)
        if m:
            return int(m.group(1)) in layers
    return False


def plan_merge(base_dir: Path, adapter_dir: Path, dtype: str = "auto", base_quant: str = "auto",
               double_quant: bool = False) -> MergePlan:
    """Read headers and configs, check that the adapter fits the base, and decide every output tensor.

    Reads no weights except the few small adapter tensors; writes nothing.
    """
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    cfg = load_adapter_config(adapter_dir)
    base = Checkpoint(base_dir)
    check_handled(base.config, f"merge into {base_dir}")
    adapter = adapter_weights(adapter_dir)
    warnings: list[str] = []
    factors, kinds, replacements = _sort_adapter_tensors(adapter)
    config = dict(base.config)
    names = _base_names(base, config)
    new_vocab = _check_replacements(replacements, names, base, adapter, config.get("vocab_size"))
    deltas = _lora_deltas(factors, kinds, replacements, cfg, names, base, adapter)
    _check_targets_covered(cfg, base, deltas)

    outputs = _outputs_in_base_order(base, replacements, deltas)
    untied = _untied_output_embedding(names, replacements, deltas)
    if untied is not None:
        outputs.append(untied)
        config["tie_word_embeddings"] = False
        warnings.append("the adapter changes one of the tied embeddings: lm_head is written explicitly and tie_word_embeddings set to false")
    if new_vocab is not None:
        _check_vocab_resized_together(outputs, names.input_embedding, base, adapter)
        config["vocab_size"] = new_vocab

    out_dtype = base.dtype if dtype == "auto" else DTYPES[dtype]
    dtype_name = next(k for k, v in config_dtypes().items() if v == out_dtype)
    config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = dtype_name

    named = cfg.get("base_model_name_or_path")
    base_name = output_stem(base_dir).name  # a hub snapshot by its repository's name
    if named and Path(named).name not in (base_name, Path(str(base.config.get("_name_or_path", ""))).name):
        warnings.append(f"the adapter names its base {named!r}, not {base_name!r}")

    quant = _base_quant(base_quant, double_quant, named, warnings)
    return MergePlan(base, adapter_dir, adapter, cfg, out_dtype, outputs, config, _side_files(base_dir, adapter_dir), warnings, quant)


def adapter_weights(adapter_dir: Path) -> TensorStore:
    """The adapter's adapter_model.safetensors as a TensorStore; missing (or only adapter_model.bin) is a BadInput."""
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        other = "adapter_model.bin exists: re-save it with safe_serialization=True" if (adapter_dir / "adapter_model.bin").exists() else "missing"
        raise BadInput(f"adapter weights {weights}: {other}")
    return TensorStore([weights])


def _sort_adapter_tensors(adapter: TensorStore) -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, str]]:
    """The adapter's tensors sorted into LoRA factors (module -> role -> adapter key), each module's layer
    kind, and whole replacement tensors (base tensor name -> adapter key)."""
    factors: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    replacements: dict[str, str] = {}
    for key in adapter.tensors:
        if not key.startswith(PEFT_PREFIX):
            raise BadInput(f"adapter tensor {key!r} is not a peft tensor (expected the prefix {PEFT_PREFIX!r})")
        name = key[len(PEFT_PREFIX):]
        for suffix, (role, kind) in LORA_SUFFIXES.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                factors.setdefault(module, {})[role] = key
                if kind:
                    kinds[module] = kind
                break
        else:
            infix = next((i for i in WRAPPER_INFIXES if i in name), None)
            if infix is None:
                replacements.setdefault(name, key)
            elif WRAPPER_INFIXES[infix]:
                replacements[name.replace(infix, ".")] = key  # the wrapper's active tensor wins
    return factors, kinds, replacements


@dataclass(frozen=True)
class _BaseNames:
    """The base's tensors by the names the adapter uses: in a tied checkpoint that stores no lm_head,
    lm_head.weight is the input embedding."""

    store: TensorStore
    tied: bool
    input_embedding: str | None

    def source(self, name: str) -> str | None:
        """The base tensor ``name`` reads, or None when the base has none."""
        if name in self.store:
            return name
        if self.tied and name == OUTPUT_EMBEDDING:
            return self.input_embedding
        return None


def _base_names(base: Checkpoint, config: dict) -> _BaseNames:
    tied = bool(config.get("tie_word_embeddings", False)) and OUTPUT_EMBEDDING not in base.store
    input_embedding = family_of(config).input_embedding
    input_embedding = input_embedding if input_embedding in base.store else None
    return _BaseNames(base.store, tied, input_embedding)


def _check_replacements(replacements: dict[str, str], names: _BaseNames, base: Checkpoint, adapter: TensorStore,
                        vocab: int | None) -> int | None:
    """Replacement tensors must name a base tensor; only vocabulary rows may grow. Returns the resized
    vocabulary size, None when it stays."""
    new_vocab = None
    for name, key in replacements.items():
        src = names.source(name)
        if src is None:
            raise BadInput(f"adapter replaces {name}, which the base model does not have (adapter trained on another model?)")
        want, got = base.store.tensors[src].shape, adapter.tensors[key].shape
        if want != got:
            if len(want) == 2 and want[0] == vocab and got[1:] == want[1:]:
                if new_vocab not in (None, got[0]):
                    raise BadInput(f"adapter resizes the vocabulary inconsistently ({new_vocab} and {got[0]} rows)")
                new_vocab = got[0]
            else:
                raise BadInput(f"adapter tensor {name} has shape {list(got)}, base has {list(want)} (adapter trained on another shape?)")
    return new_vocab


def _lora_deltas(factors: dict[str, dict[str, str]], kinds: dict[str, str], replacements: dict[str, str], cfg: dict,
                 names: _BaseNames, base: Checkpoint, adapter: TensorStore) -> dict[str, Delta]:
    """The LoRA deltas by the tensor they update; every factor pair must fit its base weight."""
    deltas: dict[str, Delta] = {}
    for module, parts in sorted(factors.items()):
        if "A" not in parts or "B" not in parts:
            raise BadInput(f"adapter has an incomplete LoRA pair for {module} (found {sorted(parts)})")
        if "magnitude" in parts and kinds[module] == "embedding":
            raise BadInput(f"DoRA on embedding layers is not supported ({module})")
        if STACKED_EXPERTS.search(module):
            deltas.update(_expert_deltas(module, parts, cfg, base, adapter))
            continue
        weight = module + ".weight"
        src = names.source(weight)
        if src is None:
            raise BadInput(f"adapter targets {module}, which the base model does not have (adapter trained on another model?)")
        # the weight the delta lands on: a replacement (resized embedding) or the base tensor
        target_shape = adapter.tensors[replacements[weight]].shape if weight in replacements else base.store.tensors[src].shape
        deltas[weight] = _module_delta(module, parts, kinds[module], cfg, target_shape, adapter)
    return deltas


def _module_delta(module: str, parts: dict[str, str], kind: str, cfg: dict, target_shape: tuple[int, ...],
                  adapter: TensorStore) -> Delta:
    """One module's LoRA (or DoRA) delta, its rank and shapes checked against the config and the weight."""
    r = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    a_shape, b_shape = adapter.tensors[parts["A"]].shape, adapter.tensors[parts["B"]].shape
    if a_shape[0] != r or b_shape[1] != r:
        raise BadInput(f"adapter {module}: LoRA rank {a_shape[0]} does not match the config's r={r}")
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out")) and kind == "linear"
    oriented = (a_shape[1], b_shape[0]) if (kind == "embedding" or fan_in_fan_out) else (b_shape[0], a_shape[1])
    if tuple(target_shape) != oriented:
        raise BadInput(
            f"adapter {module}: LoRA update has shape {list(oriented)}, base weight has {list(target_shape)} "
            "(adapter trained on another shape?)"
        )
    if "magnitude" in parts and adapter.tensors[parts["magnitude"]].shape != (oriented[1 if fan_in_fan_out else 0],):
        raise BadInput(f"adapter {module}: DoRA magnitude does not match the weight's output size")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return Delta(module, kind, parts["A"], parts["B"], scale, fan_in_fan_out, parts.get("magnitude"))


def _check_targets_covered(cfg: dict, base: Checkpoint, deltas: dict[str, Delta]) -> None:
    """Every module the config targets must have its LoRA pair (catches adapters of another model)."""
    lora_modules = {d.module for d in deltas.values()}
    missing = [
        n[: -len(".weight")]
        for n, info in base.store.tensors.items()
        if n.endswith(".weight") and len(info.shape) == 2 and _targeted(cfg, n[: -len(".weight")])
        and n[: -len(".weight")] not in lora_modules
    ]
    if missing:
        raise BadInput(f"adapter has no LoRA weights for {len(missing)} targeted modules, e.g. {missing[0]} (adapter trained on another model?)")


def _outputs_in_base_order(base: Checkpoint, replacements: dict[str, str], deltas: dict[str, Delta]) -> list[OutputTensor]:
    """One output per base tensor, in the base's on-disk order."""
    outputs: list[OutputTensor] = []
    for file in base.weight_files:
        for name in base.store.names_in(file):
            if name in replacements:
                outputs.append(OutputTensor(name, replacements[name], True, deltas.get(name)))
            else:
                outputs.append(OutputTensor(name, name, False, deltas.get(name)))
    return outputs


def _untied_output_embedding(names: _BaseNames, replacements: dict[str, str], deltas: dict[str, Delta]) -> OutputTensor | None:
    """lm_head as its own output when the adapter changes either of the tied embeddings, else None."""
    changed = any(n in deltas or n in replacements for n in (OUTPUT_EMBEDDING, names.input_embedding))
    if not (names.tied and changed):
        return None
    # peft's forward pass: each of the tied pair sees its own adapter on the shared weight, so the pair
    # is no longer equal; write lm_head explicitly rather than change the shared tensor.
    if OUTPUT_EMBEDDING in replacements:
        return OutputTensor(OUTPUT_EMBEDDING, replacements[OUTPUT_EMBEDDING], True, deltas.get(OUTPUT_EMBEDDING))
    return OutputTensor(OUTPUT_EMBEDDING, names.input_embedding, False, deltas.get(OUTPUT_EMBEDDING))


def _check_vocab_resized_together(outputs: list[OutputTensor], input_embedding: str | None, base: Checkpoint,
                                  adapter: TensorStore) -> None:
    """A resized vocabulary must be resized in every embedding the merge writes."""
    vocab_rows = {o.name: output_shape(o, base, adapter)[0] for o in outputs if o.name in (OUTPUT_EMBEDDING, input_embedding)}
    if len(set(vocab_rows.values())) > 1:
        raise BadInput(f"adapter resizes the vocabulary of only some embeddings: {vocab_rows}")


def _expert_deltas(module: str, parts: dict[str, str], cfg: dict, base: Checkpoint, adapter: TensorStore) -> dict[str, Delta]:
    """LoRA on a MoE layer's stacked experts (peft's target_parameters on transformers 5's
    ``experts.gate_up_proj`` [E, 2I, H], gate rows first, and ``experts.down_proj`` [E, H, I]) as updates of
    the checkpoint's per-expert tensors; which parameter a pair adapts follows from its shapes."""
    config = base.config
    layout = family_of(config).experts
    if layout is None:
        raise BadInput(f"adapter targets the experts of {module}: no expert layout for {config.get('model_type')!r}")
    experts, hidden, inter = expert_count(config), config["hidden_size"], expert_intermediate(config)
    (rank_rows, in_features), (out_features, rank_cols) = adapter.tensors[parts["A"]].shape, adapter.tensors[parts["B"]].shape
    if rank_rows != rank_cols or rank_rows % experts:
        raise BadInput(f"adapter {module}: LoRA factors {rank_rows} and {rank_cols} wide do not split over {experts} experts")
    split = {(2 * inter, hidden): [(layout.gate, (0, inter)), (layout.up, (inter, 2 * inter))],
             (hidden, inter): [(layout.down, None)]}.get((out_features, in_features))
    if split is None:
        raise BadInput(f"adapter {module}: LoRA update [{out_features}, {in_features}] fits neither the experts' gate/up "
                       f"[{2 * inter}, {hidden}] nor down [{hidden}, {inter}] (adapter trained on another shape?)")
    r = rank_rows // experts
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    block = renamer(layout, to_checkpoint=True)(STACKED_EXPERTS.sub("", module) + ".")
    deltas = {}
    for e in range(experts):
        for proj, rows in split:
            name = f"{block}experts.{e}.{proj}.weight"
            want = ((rows[1] - rows[0]) if rows else out_features, in_features)
            if base.store.tensors.get(name) is None or tuple(base.store.tensors[name].shape) != want:
                raise BadInput(f"adapter {module}: the base has no expert tensor {name} of shape {list(want)}")
            deltas[name] = Delta(module, "linear", parts["A"], parts["B"], scale, False, expert=e, experts=experts, rows=rows)
    return deltas


def _base_quant(choice: str, double_quant: bool, named: str | None, warnings: list[str]) -> BaseQuant | None:
    """--base-quant: nf4/fp4 as given; none; auto: NF4 + double quantization when the adapter's recorded
    base name says 4-bit (a guess from a name, so it warns)."""
    if choice in ("nf4", "fp4"):
        return BaseQuant(choice, double_quant)
    if choice == "auto" and named and FOUR_BIT_BASE.search(named):
        quant = BaseQuant("nf4", True)
        warnings.append(f"the adapter was trained on {named!r}, a 4-bit base: merged onto the base quantized to "
                        f"{quant.describe()} as in training; --base-quant none merges onto the full-precision weights")
        return quant
    return None


def output_shape(o: OutputTensor, base: Checkpoint, adapter: TensorStore) -> tuple[int, ...]:
    """The shape of an output tensor: that of its source tensor, in the adapter or the base."""
    return (adapter if o.from_adapter else base.store).tensors[o.source].shape


def _side_files(base_dir: Path, adapter_dir: Path) -> list[tuple[Path, str]]:
    """Base side files, with the tokenizer, chat template and generation config taken from the adapter
    folder when it has them (training often saves an updated tokenizer there)."""
    from_adapter = set(side_files(adapter_dir))
    chosen = {name: base_dir for name in side_files(base_dir)}
    if from_adapter & set(TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            chosen.pop(name, None)
        chosen.update({n: adapter_dir for n in from_adapter & set(TOKENIZER_FILES)})
    for group in (CHAT_TEMPLATE_FILES, (GENERATION_CONFIG,)):
        if from_adapter & set(group):
            for name in group:
                chosen.pop(name, None)
            chosen.update({n: adapter_dir for n in from_adapter & set(group)})
    return sorted(((d, n) for n, d in chosen.items()), key=lambda x: x[1])


PROBE_ROWS = 64


def merged_tensor(o: OutputTensor, plan: MergePlan, probe: dict, workspace: torch.Tensor) -> torch.Tensor:
    """The output tensor in the target dtype; LoRA math in float32 inside ``workspace`` (reused across
    tensors: a fresh float32 buffer per weight costs more in page faults than the conversion itself).
    Records a probe check in ``probe``."""
    store = plan.adapter if o.from_adapter else plan.base.store
    weight = store.get(o.source)
    if plan.requantized(o):
        weight = plan.base_quant.round_trip(weight)
    d = o.delta
    if d is None:
        return weight.to(plan.dtype) if weight.is_floating_point() else weight
    merged = workspace[: weight.numel()].view(weight.shape).copy_(weight)
    # the rows (output features) the self-check probes, taken before the in-place update
    rows_of = (lambda t: t.T) if d.transposed else (lambda t: t)
    picked = torch.linspace(0, rows_of(merged).shape[0] - 1, PROBE_ROWS).long().unique()
    base_rows = rows_of(merged)[picked].clone()
    d.add_to(merged, plan.adapter)
    factor = None
    if d.magnitude is not None:
        # DoRA: rescale each output row of (W + s·BA) to the learned magnitude (peft's weight norm over dim 1)
        factor = plan.adapter.get(d.magnitude).float() / torch.linalg.norm(rows_of(merged), dim=1)
        rows_of(merged).mul_(factor[:, None])
    out = merged.to(plan.dtype, copy=True)  # the workspace is reused; the writer keeps ``out``
    _probe(o.name, d, plan.adapter, picked, rows_of(out)[picked], base_rows, None if factor is None else factor[picked], probe)
    return out


def _probe(name: str, d: Delta, adapter: TensorStore, rows, out_rows, base_rows, factor, probe: dict) -> None:
    """Self-check on sampled output rows: the written weight applied to a fixed random vector vs. the
    factored LoRA form W·x + s·B(A·x) (times the DoRA factor). Catches orientation, scale and cast errors."""
    a, b = d.factors(adapter)
    x = torch.randn(a.shape[1], generator=torch.Generator().manual_seed(0))
    ref = base_rows @ x + d.scale * (b[rows] @ (a @ x))
    if factor is not None:
        ref = ref * factor
    err = float(torch.linalg.norm(out_rows.float() @ x - ref) / torch.linalg.norm(ref).clamp_min(1e-30))
    probe["modules"] = probe.get("modules", 0) + 1
    if not err <= probe.get("max_rel_error", -1.0):  # NaN counts as the worst
        probe["max_rel_error"], probe["worst_tensor"] = err, name
