"""YAML files with a fixed schema (quantization recipes, release files): parse to a mapping and check every
key and type, with errors that name the file and the key."""

from __future__ import annotations

import yaml

from .errors import BadInput


def parse_mapping(text: str, what: str) -> dict:
    """The YAML mapping in ``text``; invalid YAML, or a document that is not a mapping, is a BadInput naming
    ``what``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadInput(f"{what} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{what} must be a mapping of keys")
    return data


def check_types(mapping: dict, schema: dict[str, tuple[type, ...]], where: str, prefix: str = "") -> None:
    """Every key known and of one of its types (a bool is not an int unless bool is named). ``prefix``
    names a nested section in the messages, e.g. 'calibration.'."""
    for key, value in mapping.items():
        if key not in schema:
            raise BadInput(f"{where}: unknown key '{prefix}{key}' (known: {', '.join(schema)})")
        kinds = schema[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds if k is not type(None))
            raise BadInput(f"{where}: {prefix}{key} must be a {names}, got {type(value).__name__}")
