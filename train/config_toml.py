"""A trainer's fully resolved configuration as TOML that ``--config`` accepts, each key commented with where its
value comes from (``distillkit train METHOD --show-config``).

Why: a run's numbers are only comparable with a paper's when each one's origin is known. The trainer says what
its defaults follow (``Trainer.config_sources``: a released file and line, or distillkit's own choice and why) and
fills in what it leaves to the network size (``Trainer.effective_config``); the user's own settings are named as
such. The text parses back with ``tomllib`` to the same configuration, so it can be saved, edited and passed to
``--config``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from distillkit.pipelines.manifest import Key

DEFAULT_SOURCE = "distillkit's default"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (the dotted names ``--set`` takes).

    Args:
        config: a (nested) configuration.
        prefix: the dotted name of ``config`` itself ("" at the top).
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        else:
            out[name] = value
    return out


def toml_value(value: Any) -> str:
    """One TOML value: booleans, integers, floats (``inf``/``nan`` as TOML spells them), strings, arrays.

    Args:
        value: a scalar or a list of scalars.

    Raises:
        TypeError: a value TOML cannot hold (None is left out by the caller).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _schema_key(schema: dict[str, Any], dotted: str) -> Key | None:
    node: Any = schema
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Key) else None


def render_config(trainer: Any, config: dict[str, Any], user: dict[str, str] | None = None) -> str:
    """The TOML text of ``trainer.effective_config(config)``, every key preceded by a comment with its source.

    Args:
        trainer: the trainer class (``Trainer`` subclass): its schema, ``effective_config``, ``config_sources``.
        config: a resolved configuration (``Trainer.resolve_config``).
        user: dotted key -> how the user set it (``"--set"``, ``"--config FILE"``, ``"--batch-size"``, ...): those
            keys are commented as the user's, whatever the trainer's source for its default.

    Returns:
        TOML text; keys whose value stays unset (None) appear as comments only.
    """
    user = user or {}
    effective = trainer.effective_config(config)
    sources = trainer.config_sources(config)
    schema = trainer.config_schema()
    flat = flatten(effective)
    size = effective.get("size")
    lines = [f"# distillkit train {trainer.name}: the fully resolved configuration"
             + (f" at size {size!r}" if isinstance(size, str) else "") + ".",
             "# Each key's comment says where its value comes from; save this file and pass it back with --config."]
    top = {k: v for k, v in flat.items() if "." not in k}
    tables: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        if "." in k:
            table, _, leaf = k.rpartition(".")
            tables.setdefault(table, {})[leaf] = v
    for table, keys in [("", top), *tables.items()]:
        lines.append("")
        if table:
            lines.append(f"[{table}]")
        for leaf, value in keys.items():
            dotted = f"{table}.{leaf}" if table else leaf
            origin = f"set by you ({user[dotted]})" if dotted in user else sources.get(dotted, DEFAULT_SOURCE)
            key = _schema_key(schema, dotted)
            doc = f"{key.doc}. " if key is not None and key.doc else ""
            if doc:
                lines.append(f"# {doc.rstrip('. ')}")
            lines.append(f"# source: {origin}")
            if value is None:
                lines.append(f"# {leaf} is unset")
            else:
                lines.append(f"{leaf} = {toml_value(value)}")
    return "\n".join(lines) + "\n"
