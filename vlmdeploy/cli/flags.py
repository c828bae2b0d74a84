"""argparse flags generated from config dataclasses, so every setting is declared once.

A field `max_batch_size: int | None = None` becomes `--max-batch-size` with `type=int` and the
field's default; `bool` fields become switches (`--eager-mode`, or `--x/--no-x` when the default is
True); `Literal[...]` gives `choices`; `list[int]`/`tuple[str, ...]` take one or more values.
Dict-typed fields have no flag. Each flag's destination is `<prefix><field>`, and `build` turns the
parsed namespace back into the dataclass, so its `__post_init__` validates the values.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

T = TypeVar("T")
_SCALARS = (int, float, str)


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return tp


def _argparse_spec(tp: Any, default: Any) -> dict[str, Any] | None:
    """argparse keywords for a field of type `tp`, or None when it cannot be a flag."""
    base = _strip_optional(tp)
    origin = typing.get_origin(base)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction if default else "store_true"}
    if base in _SCALARS:
        return {"type": base}
    if origin is Literal:
        choices = typing.get_args(base)
        return {"type": type(choices[0]), "choices": choices}
    if origin in (list, tuple):
        elem = typing.get_args(base)[0]
        return {"type": elem, "nargs": "+"} if elem in _SCALARS else None
    return None


def flag_name(field: str, rename: dict[str, str] | None = None) -> str:
    return "--" + (rename or {}).get(field, field).replace("_", "-")


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                        prefix: str, names: Iterable[str] | None = None,
                        rename: dict[str, str] | None = None,
                        helps: dict[str, str] | None = None) -> list[str]:
    """Add a flag per field of `cls` (or of `names` only); returns the fields that got one."""
    hints = typing.get_type_hints(cls)
    wanted = None if names is None else set(names)
    added = []
    for field in dataclasses.fields(cls):
        if wanted is not None and field.name not in wanted:
            continue
        spec = _argparse_spec(hints[field.name], field.default)
        if spec is None:
            continue
        text = field.metadata.get("help") or (helps or {}).get(field.name) or \
            f"{cls.__name__}.{field.name}"
        if "default:" not in text and "action" not in spec:
            text += " (default: %(default)s)"
        if "action" not in spec:
            spec["metavar"] = (rename or {}).get(field.name, field.name).upper()
        if "nargs" in field.metadata and "nargs" in spec:
            spec["nargs"] = field.metadata["nargs"]
        parser.add_argument(flag_name(field.name, rename), dest=prefix + field.name,
                            default=field.default, help=text, **spec)
        added.append(field.name)
    return added


def build(cls: type[T], args: argparse.Namespace, prefix: str, **extra: Any) -> T:
    """The dataclass from the flags parsed under `prefix` (validated by its constructor)."""
    hints = typing.get_type_hints(cls)
    values = dict(extra)
    for name, value in vars(args).items():
        if not name.startswith(prefix):
            continue
        field = name[len(prefix):]
        if isinstance(value, list) and typing.get_origin(_strip_optional(hints[field])) is tuple:
            value = tuple(value)
        values[field] = value
    return cls(**values)
