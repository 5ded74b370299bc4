"""Strict conversion of plain YAML data into typed dataclasses.

The recipe (:mod:`distill.recipe`) declares its sections as dataclasses; this module turns a
nested dict into them and refuses anything it cannot vouch for, with one line that names the
key path: an unknown key (with the closest valid key for a typo), a value of the wrong type,
a value out of range or not among the allowed choices.

Range limits and help text live in each field's metadata (``field(metadata=...)``), so the
schema and its validation are one declaration.

Open sections: a dataclass may set ``__sections__ = "<field>"`` and define a classmethod
``section_types()`` returning ``{key: dataclass}``; each such key is then a sub-section of
its own (built from its dataclass, defaults filled in), collected in that dict field and
written back inline. The recipe's ``distill`` section uses it for one section per
registered loss family (``distill.kd``, ``distill.ot`` ...), so a new family brings its
recipe keys with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from distill.core.errors import RecipeError

_MISSING = dataclasses.MISSING
_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def spec(default: Any = _MISSING, *, help: str = "", ge: float | None = None,
         le: float | None = None, gt: float | None = None, lt: float | None = None,
         default_factory: Any = _MISSING, since: str | None = None) -> Any:
    """A dataclass field with help text and an inclusive/exclusive numeric range.

    ``since``: the version that added the field; :func:`to_hash_dict` leaves it out while
    it holds its default, so hashes of settings made before it existed do not change."""
    meta = {"help": help, "ge": ge, "le": le, "gt": gt, "lt": lt, "since": since}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def closest(name: str, candidates: list[str]) -> str | None:
    """The candidate most like ``name`` (for "did you mean"), or None."""
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return match[0] if match else None


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def unknown_key(path: str, key: str, valid: list[str]) -> RecipeError:
    """``unknown key 'data.samplng_rate'; did you mean 'data.sampling_rate'?`` (or the list)."""
    full = _join(path, key)
    hint = closest(str(key), valid)
    if hint:
        return RecipeError(f"unknown key '{full}'; did you mean '{_join(path, hint)}'?")
    where = f" under '{path}'" if path else ""
    return RecipeError(f"unknown key '{full}'; valid keys{where}: {', '.join(valid)}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Mapping):
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fail_type(path: str, tp: Any, value: Any) -> RecipeError:
    return RecipeError(
        f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {_describe(value)}"
    )


def convert(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` to type ``tp``, raising RecipeError naming ``path`` on mismatch."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _fail_type(path, tp, value)
        return build(tp, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _fail_type(path, tp, value)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path)
            except RecipeError as exc:
                errors.append(exc)
        # One alternative is the structured one (a mapping, a list): its error is the useful one.
        if len(errors) == 1 or isinstance(value, (Mapping, list)):
            raise errors[-1]
        raise _fail_type(path, tp, value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        hint = closest(str(value), [str(c) for c in choices]) if isinstance(value, str) else None
        extra = f"; did you mean {hint!r}?" if hint else ""
        raise RecipeError(
            f"{path}: {_describe(value)} is not one of {', '.join(repr(c) for c in choices)}{extra}"
        )
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail_type(path, tp, value)
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        items = [convert(item_tp, v, _join(path, i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _fail_type(path, tp, value)
        _key_tp, val_tp = typing.get_args(tp)
        return {str(k): convert(val_tp, v, _join(path, k)) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail_type(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail_type(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 3e-4 (no dot) as a string; accept such number literals.
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)
        raise _fail_type(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail_type(path, tp, value)
    raise TypeError(f"schema error at {path}: unsupported type {tp!r}")


def _check_range(path: str, value: Any, meta: Mapping[str, Any]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for key, sign, ok in (("ge", ">=", lambda b: value >= b), ("le", "<=", lambda b: value <= b),
                          ("gt", ">", lambda b: value > b), ("lt", "<", lambda b: value < b)):
        bound = meta.get(key)
        if bound is not None and not ok(bound):
            raise RecipeError(f"{path}: must be {sign} {bound}, got {value}")


def section_types(cls: type) -> dict[str, type]:
    """The open sections of ``cls`` (see the module docstring), or {}."""
    return dict(cls.section_types()) if getattr(cls, "__sections__", None) else {}


def field_names(cls: type) -> list[str]:
    """The keys a mapping for ``cls`` may hold: its fields (an open-sections field
    replaced by the section keys)."""
    holder = getattr(cls, "__sections__", None)
    return [f.name for f in dataclasses.fields(cls) if f.name != holder] + list(section_types(cls))


def build(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; every key checked, every value typed."""
    hints = typing.get_type_hints(cls)
    holder = getattr(cls, "__sections__", None)
    sections = section_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != holder}
    for key in data:
        if key not in fields and key not in sections:
            raise unknown_key(path, str(key), field_names(cls))
    kwargs: dict[str, Any] = {}
    if holder:
        kwargs[holder] = {}
        for key, tp in sections.items():
            value = data.get(key)
            if value is None:
                value = {}
            elif dataclasses.is_dataclass(value):
                value = to_dict(value)
            kwargs[holder][key] = convert(tp, value, _join(path, key))
    for name, f in fields.items():
        fpath = _join(path, name)
        if name in data:
            value = convert(hints[name], data[name], fpath)
        elif f.default is not _MISSING:
            value = f.default
        elif f.default_factory is not _MISSING:
            value = f.default_factory()
        else:
            raise RecipeError(f"missing required key '{fpath}'")
        _check_range(fpath, value, f.metadata)
        if isinstance(value, list):
            for i, item in enumerate(value):
                _check_range(_join(fpath, i), item, f.metadata)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ValueError as exc:  # a dataclass's own __post_init__ check
        if isinstance(exc, RecipeError):
            raise
        raise RecipeError(f"{_join(path, str(exc))}" if path else str(exc)) from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check(path)
    return obj


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not _MISSING else f.default


def to_hash_dict(obj: Any) -> Any:
    """:func:`to_dict` less the fields added after a hash was first taken (``since``) that
    hold their default: what stage hashes and job fingerprints read."""
    return to_dict(obj, hashing=True)


def to_dict(obj: Any, *, hashing: bool = False) -> Any:
    """A dataclass tree as plain lists and dicts (what YAML writes back); with ``hashing``,
    as :func:`to_hash_dict`."""
    if dataclasses.is_dataclass(obj):
        holder = getattr(obj, "__sections__", None)
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == holder or (hashing and f.metadata.get("since")
                                    and to_dict(value) == to_dict(_default(f))):
                continue
            out[f.name] = to_dict(value, hashing=hashing)
        if holder:
            out.update({k: to_dict(v, hashing=hashing) for k, v in getattr(obj, holder).items()})
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, hashing=hashing) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v, hashing=hashing) for k, v in obj.items()}
    return obj
