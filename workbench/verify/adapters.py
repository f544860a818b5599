"""LoRA adapters served unmerged: a pre-check from the adapter's own files of what the engine cannot serve
(those must be merged), the rank to start the engine with, and how requests name an adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import TensorStore, read_json
from ..engines import EngineSpec
from ..errors import BadInput
from ..hub import output_stem, resolve_model
from ..safety import check_name, check_remote_code

ADAPTER_CONFIG = "adapter_config.json"
# init_lora_weights that change the base weights when peft loads the adapter (the engine never sees that)
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "eva")

# adapter_config.json features no engine serves unmerged: (key, is it used, why)
REFUSED_FEATURES = (
    ("use_dora", bool, "DoRA (magnitude vectors): engines serve plain LoRA only"),
    ("modules_to_save", bool, "modules_to_save replaces whole modules: {}"),
    ("bias", lambda v: v not in (None, "none"), "trained biases (bias={})"),
    ("lora_bias", bool, "LoRA bias"),
    ("trainable_token_indices", bool, "trained token embeddings: {}"),
    ("target_parameters", bool, "adapters on parameters (MoE experts): {}"),
    ("layer_replication", bool, "layer replication"),
    ("alora_invocation_tokens", bool, "activated LoRA"),
    ("use_qalora", bool, "QA-LoRA"),
    ("init_lora_weights", lambda v: isinstance(v, str) and v.lower().startswith(BASE_CHANGING_INITS),
     "init_lora_weights={} changes the base weights"),
)


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter to serve unmerged: its name in requests, its folder, its largest rank, and why the
    engine cannot serve it (empty: it can)."""
    name: str
    path: Path
    rank: int
    reasons: tuple[str, ...]  # why the engine cannot serve it unmerged (empty: it can)


def parse_adapters(items: tuple[str, ...]) -> dict[str, Path]:
    """NAME=PATH items, PATH a folder or a hub id (a bare PATH is named after its folder or repository)."""
    adapters: dict[str, Path] = {}
    for item in items:
        name, _, given = item.rpartition("=")
        path = resolve_model(given, "adapter")
        name = name or output_stem(path).name
        check_name(name, "adapter name")
        if name in adapters:
            raise BadInput(f"adapter name {name!r} given twice")
        if not (Path(path) / ADAPTER_CONFIG).is_file():
            raise BadInput(f"adapter {name}: no {ADAPTER_CONFIG} in {path}")
        check_remote_code(Path(path))
        adapters[name] = Path(path).absolute()
    return adapters


def _weight_names(path: Path) -> list[str]:
    """The tensor names of an adapter's safetensors files, from their headers (checkpoint.py, the one reader)."""
    return list(TensorStore(sorted(path.glob("*.safetensors"))).tensors)


def check_adapter(name: str, path: Path, spec: EngineSpec, base_config: dict) -> Adapter:
    """What stops ``spec`` from serving this adapter unmerged."""
    config = read_json(path / ADAPTER_CONFIG, ADAPTER_CONFIG)
    rank = max([int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())])
    if spec.lora is None:
        return Adapter(name, path, rank, (f"{spec.name} does not serve LoRA adapters unmerged",))
    reasons = [why.format(config[key]) for key, used, why in REFUSED_FEATURES if used(config.get(key))]
    if config.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type {config.get('peft_type')}: engines serve LoRA only")
    weights = _weight_names(path)
    full = sorted({n for n in weights if "lora_" not in n})
    if full:
        reasons.append(f"full tensors beside the LoRA weights (a resized vocabulary or trained modules): {', '.join(full[:3])}")
    modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in weights if ".lora_" in n}
    if modules - spec.lora.targets:
        reasons.append(f"{spec.name} cannot adapt {', '.join(sorted(modules - spec.lora.targets))}")
    vocab = (base_config.get("text_config", base_config)).get("vocab_size")
    tokenizer_file = path / "tokenizer.json"
    if vocab and tokenizer_file.is_file():
        size = _tokenizer_size(tokenizer_file)
        if size > int(vocab):
            reasons.append(f"its tokenizer has {size} tokens, the base's vocabulary {vocab}: merge the resized embeddings")
    if spec.lora.ranks and rank > max(spec.lora.ranks):
        reasons.append(f"rank {rank} is above {spec.name}'s largest --max-lora-rank {max(spec.lora.ranks)}")
    return Adapter(name, path, rank, tuple(reasons))


def _tokenizer_size(path: Path) -> int:
    data = read_json(path, path.name)
    ids = list((data.get("model") or {}).get("vocab", {}).values()) if isinstance((data.get("model") or {}).get("vocab"), dict) else []
    ids += [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else 0


def engine_rank(spec: EngineSpec, adapters: list[Adapter]) -> int | None:
    """The smallest rank limit the engine accepts that fits every adapter."""
    rank = max((a.rank for a in adapters), default=0)
    if not rank:
        return None
    return min((r for r in spec.lora.ranks if r >= rank), default=rank) if spec.lora.ranks else rank


def request_model(spec: EngineSpec, base: str, adapter: str) -> str:
    """The OpenAI "model" of a request for ``adapter`` on the engine serving ``base`` (its LoraSpec's form)."""
    return spec.lora.request_model.format(base=base, adapter=adapter)
