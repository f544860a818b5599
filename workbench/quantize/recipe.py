"""Quantization recipes: YAML files with a fixed schema. Shipped ones are package data (workbench/recipes/),
so an installed wheel has them; users pass their own with --recipe. Every key and type is checked, and
errors name the key."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..errors import BadInput
from ..options import KV_CACHE_KINDS, Calibration
from ..yamlfile import check_types, parse_mapping

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# the names users type for --method -> shipped recipe files (every recipe's own name works too)
METHOD_ALIASES = {"fp8": "fp8-static", "gptq": "gptq-w4a16", "awq": "awq-w4a16", "w8a8": "w8a8-int8", "int8": "w8a8-int8"}


@dataclass(frozen=True)
class Recipe:
    """One quantization recipe, as its YAML file gives it: method, scheme, output format and their options;
    ``name``: the file's stem."""
    method: str
    scheme: str
    targets: list[str]
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    calibration: Calibration | None = None
    format: str = "fp8"
    actorder: str | None = "static"  # GPTQ activation ordering
    smoothing_strength: float = 0.8  # SmoothQuant, for w8a8
    double_quant: bool = True  # bitsandbytes: quantize the block scales too (QLoRA's default)
    kv_cache: str | None = None  # "fp8": calibrate and write FP8 KV-cache scales too (kvcache.py, or llm-compressor's)
    name: str = ""
    source: str = ""  # the YAML text, copied into the artifact

    def with_overrides(self, **values) -> "Recipe":
        """Command-line overrides: None means 'keep the recipe's value'."""
        cal_keys = {f.name for f in fields(Calibration)}
        cal = {k: v for k, v in values.items() if k in cal_keys and v is not None}
        top = {k: v for k, v in values.items() if k not in cal_keys and v is not None}
        recipe = replace(self, **top)
        if cal:
            recipe = replace(recipe, calibration=replace(recipe.calibration or Calibration(), **cal))
        return validate(recipe)


# key -> accepted types
SCHEMA = {
    "method": (str,), "scheme": (str,), "targets": (list,), "ignore": (list,), "calibration": (dict,),
    "format": (str,), "actorder": (str, type(None)), "smoothing_strength": (float, int), "double_quant": (bool,),
    "kv_cache": (str, type(None)),
}
# method -> (schemes, formats); the first format is the default. Only FP8 has the seed's own "fp8" format.
METHODS = {
    "fp8": (("static", "dynamic", "block"), ("fp8", "compressed-tensors")),
    "gptq": (("w4a16",), ("compressed-tensors",)),
    "awq": (("w4a16",), ("compressed-tensors",)),
    "w8a8": (("w8a8",), ("compressed-tensors",)),
    "bnb": (("nf4", "fp4"), ("bitsandbytes",)),
    # 4-bit floats in 16-element groups (NVFP4: FP8 group scales under a global one; MXFP4: power-of-two scales
    # per 32), by llm-compressor; "a16": activations stay in 16 bits
    "fp4": (("nvfp4a16", "nvfp4", "mxfp4a16"), ("compressed-tensors",)),
}
# methods whose calibration solves a problem per layer (GPTQ's Hessians, AWQ's scale search, SmoothQuant + GPTQ):
# hours on a CPU at real sizes, so a release plan's job for them asks for an accelerator
WANTS_ACCELERATOR = frozenset({"gptq", "awq", "w8a8"})
KV_CACHE_FORMATS = ("fp8", "compressed-tensors")  # vLLM reads KV-cache scales from both
NEEDS_CALIBRATION = {("fp8", "static"), ("gptq", "w4a16"), ("awq", "w4a16"), ("w8a8", "w8a8"), ("fp4", "nvfp4")}
CALIBRATION_SCHEMA = {"data": (str,), "field": (str,), "samples": (int,), "seq_len": (int,), "seed": (int,), "chat_template": (bool,)}


def shipped() -> list[str]:
    """The names --method accepts: the shipped recipes' names and their short aliases, sorted."""
    return sorted([p.stem for p in RECIPES_DIR.glob("*.yaml")] + list(METHOD_ALIASES))


def method_help() -> str:
    """The --method names, each recipe with the short names that mean it."""
    names = []
    for recipe in sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")):
        aliases = [a for a, target in METHOD_ALIASES.items() if target == recipe]
        names.append(f"{recipe} (or {' / '.join(aliases)})" if aliases else recipe)
    return ", ".join(names)


def load(method: str | None, path: Path | None) -> Recipe:
    """The recipe in the file ``path``, or else the shipped one ``method`` names (a recipe's name or an alias),
    with every key and type checked; an unknown method, a missing file or a bad key is a BadInput."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise BadInput(f"recipe not found: {file}")
    else:
        name = METHOD_ALIASES.get(method, method)
        file = RECIPES_DIR / f"{name}.yaml"
        if not method or not file.is_file():
            raise BadInput(f"unknown method {method!r}; available: {', '.join(shipped())}")
    text = file.read_text()
    data = parse_mapping(text, f"recipe {file}")
    check_types(data, SCHEMA, f"recipe {file}")
    cal = data.pop("calibration", None)
    if cal is not None:
        check_types(cal, CALIBRATION_SCHEMA, f"recipe {file}", prefix="calibration.")
        cal = Calibration(**cal)
    for key in ("method", "scheme", "targets"):
        if key not in data:
            raise BadInput(f"recipe {file}: missing key {key!r}")
    if data["method"] in METHODS:
        data.setdefault("format", METHODS[data["method"]][1][0])
    return validate(Recipe(**data, calibration=cal, name=file.stem, source=text))


def needs_calibration(recipe: Recipe) -> bool:
    """Whether the recipe calibrates on text: its scheme's activation scales, or KV-cache scales."""
    return (recipe.method, recipe.scheme) in NEEDS_CALIBRATION or recipe.kv_cache is not None


def _with_kv_cache(recipe: Recipe) -> Recipe:
    """KV-cache scales: FP8, in vLLM's fp8 format (the workbench's walk) or compressed-tensors' kv_cache_scheme
    (llm-compressor); calibrated on the recipe's text, or the embedded default when the scheme needs none."""
    if recipe.kv_cache not in KV_CACHE_KINDS:
        raise BadInput(f"recipe: kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {recipe.kv_cache!r}")
    if recipe.format not in KV_CACHE_FORMATS:
        raise BadInput(f"recipe: kv_cache scales are written in the {' and '.join(KV_CACHE_FORMATS)} formats, not "
                       f"{recipe.method} in {recipe.format}")
    return recipe if recipe.calibration is not None else replace(recipe, calibration=Calibration())


def validate(recipe: Recipe) -> Recipe:
    """``recipe`` when its method, scheme, format, targets and calibration go together (with ``kv_cache``: checked,
    and given the default calibration when it has none); otherwise a BadInput naming the key."""
    if recipe.method not in METHODS:
        raise BadInput(f"recipe: method must be one of {', '.join(METHODS)}, got {recipe.method!r}")
    schemes, formats = METHODS[recipe.method]
    if recipe.scheme not in schemes:
        raise BadInput(f"recipe: scheme for {recipe.method} must be one of {', '.join(schemes)}, got {recipe.scheme!r}")
    if recipe.format not in formats:
        raise BadInput(f"recipe: format for {recipe.method} must be one of {', '.join(formats)}, got {recipe.format!r}")
    if recipe.targets != ["Linear"]:
        raise BadInput(f"recipe: targets must be [Linear] for {recipe.method}, got {recipe.targets}")
    if (recipe.method, recipe.scheme) in NEEDS_CALIBRATION and recipe.calibration is None:
        raise BadInput(f"recipe: {recipe.method} {recipe.scheme} needs a calibration section")
    if recipe.kv_cache is not None:
        recipe = _with_kv_cache(recipe)
    cal = recipe.calibration
    if cal is not None and (cal.samples < 1 or cal.seq_len < 2):
        raise BadInput(f"recipe: calibration needs samples >= 1 and seq_len >= 2, got {cal.samples}, {cal.seq_len}")
    return recipe
