"""Quantization recipes: YAML files with a fixed schema. Shipped ones live in recipes/ at the project root;
users pass their own with --recipe. Every key and type is checked, and errors name the key."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from ..errors import BadInput

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
# --method names -> shipped recipe files
METHOD_ALIASES = {"fp8": "fp8-static"}


@dataclass(frozen=True)
class Calibration:
    data: str = "default"
    field: str = "text"
    samples: int = 128
    seq_len: int = 256
    seed: int = 0
    chat_template: bool = False


@dataclass(frozen=True)
class Recipe:
    method: str
    scheme: str
    targets: list[str]
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    calibration: Calibration | None = None
    format: str = "fp8"
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


# key -> (type, allowed values or None)
SCHEMA = {
    "method": (str, ("fp8",)),
    "scheme": (str, ("static", "dynamic")),
    "targets": (list, None),
    "ignore": (list, None),
    "calibration": (dict, None),
    "format": (str, ("fp8",)),
}
CALIBRATION_SCHEMA = {"data": str, "field": str, "samples": int, "seq_len": int, "seed": int, "chat_template": bool}


def shipped() -> list[str]:
    return sorted([p.stem for p in RECIPES_DIR.glob("*.yaml")] + list(METHOD_ALIASES))


def load(method: str | None, path: Path | None) -> Recipe:
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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInput(f"recipe {file} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BadInput(f"recipe {file} is not a mapping")
    for key, value in data.items():
        if key not in SCHEMA:
            raise BadInput(f"recipe {file}: unknown key {key!r} (known: {', '.join(SCHEMA)})")
        kind, allowed = SCHEMA[key]
        if not isinstance(value, kind):
            raise BadInput(f"recipe {file}: {key} must be a {kind.__name__}, got {type(value).__name__}")
    cal = data.pop("calibration", None)
    if cal is not None:
        for key, value in cal.items():
            if key not in CALIBRATION_SCHEMA:
                raise BadInput(f"recipe {file}: unknown key 'calibration.{key}' (known: {', '.join(CALIBRATION_SCHEMA)})")
            kind = CALIBRATION_SCHEMA[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise BadInput(f"recipe {file}: calibration.{key} must be a {kind.__name__}, got {type(value).__name__}")
        cal = Calibration(**cal)
    for key in ("method", "scheme", "targets"):
        if key not in data:
            raise BadInput(f"recipe {file}: missing key {key!r}")
    return validate(Recipe(**data, calibration=cal, name=file.stem, source=text))


def validate(recipe: Recipe) -> Recipe:
    for key in ("method", "scheme", "format"):
        allowed = SCHEMA[key][1]
        if getattr(recipe, key) not in allowed:
            raise BadInput(f"recipe: {key} must be one of {', '.join(allowed)}, got {getattr(recipe, key)!r}")
    if recipe.targets != ["Linear"]:
        raise BadInput(f"recipe: targets must be [Linear] for {recipe.method}, got {recipe.targets}")
    if recipe.scheme == "static" and recipe.calibration is None:
        raise BadInput("recipe: static activation scales need a calibration section")
    cal = recipe.calibration
    if cal is not None and (cal.samples < 1 or cal.seq_len < 2):
        raise BadInput(f"recipe: calibration needs samples >= 1 and seq_len >= 2, got {cal.samples}, {cal.seq_len}")
    return recipe
