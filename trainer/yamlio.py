"""YAML reading and ``key.sub=value`` overrides, with errors in the user's terms."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainer.errors import UserError


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float, as YAML 1.2 does (1.1 wants ``1.0e-3``).

    Learning rates are written that way; as strings they would pass through a list of grid
    values untouched and reach Optuna, the map and the MLflow params as text.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` semantics (no arbitrary objects) plus YAML 1.2 exponent floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; raise UserError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "command line") -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.sub=value`` overrides applied.

    Values are parsed as YAML scalars or flow collections (``lr=1e-4``,
    ``space.method=[full,lora]``). Unknown keys are caught by the schema later.
    """
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"{source}: override {item!r} is not of the form key.sub=value")
        try:
            value = safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise UserError(f"{source}: override {item!r}: cannot parse value {raw!r}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"{source}: override {item!r}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = value
    return out


def validation_message(exc: ValidationError, source: str) -> str:
    """All schema errors at once, each naming the key path and the bad value."""
    lines = [f"{source}: {exc.error_count()} problem(s) in the configuration:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = err.get("input")
        shown = "" if err["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {loc or '<top>'}: {msg}{shown}")
    return "\n".join(lines)


def validate(model: type[BaseModel], data: dict[str, Any], source: str) -> BaseModel:
    """Validate ``data`` into ``model``; raise one UserError listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(validation_message(exc, source)) from None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
