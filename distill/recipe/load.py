"""Loading recipes: YAML plus ``key.sub=value`` overrides, validated strictly before any work.

``load_recipe`` reads the YAML, applies the command-line overrides and builds the
dataclasses of :mod:`distill.recipe.schema`. Keys of the 0.1 ``distill`` section
(``distill.temperature``, ``distill.ot_reg``, ``distill.align_dim`` ...) are still read,
moved to their loss family's section (``distill.kd.temperature`` ...) with a warning.
"""

from __future__ import annotations

import dataclasses
import os
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from distill.core.errors import RecipeError
from distill.core.io import atomic_write_text
from distill.core.schema import build, field_names, section_types, to_dict, unknown_key
from distill.recipe.schema import LEGACY_DISTILL_KEYS, Recipe


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _schema_at(cls: Any, parts: list[str], full: str) -> None:
    """Check an override's key path against the schema, so a typo names the closest key."""
    tp: Any = cls
    walked: list[str] = []
    for part in parts:
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            if not part.isdigit():
                raise RecipeError(f"override '{full}': '{'.'.join(walked)}' is a list; use an index")
            tp = typing.get_args(tp)[0]
        elif origin in (dict, Mapping):  # free keys (distill.weights: checked by validate)
            tp = typing.get_args(tp)[1]
        elif dataclasses.is_dataclass(tp):
            names = field_names(tp)
            if part not in names:
                raise unknown_key(".".join(walked), part, names)
            sections = section_types(tp)
            tp = sections[part] if part in sections else typing.get_type_hints(tp)[part]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if typing.get_origin(tp) is not list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
                tp = args[0]
        else:
            raise RecipeError(f"override '{full}': '{'.'.join(walked)}' has no sub-keys")
        walked.append(part)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` in the raw recipe dict (lists indexed by number)."""
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) == 2 and parts[0] == "distill" and parts[1] in LEGACY_DISTILL_KEYS:
            for loss, key in LEGACY_DISTILL_KEYS[parts[1]]:
                _warn_legacy(parts[1], loss, key)
                data = apply_overrides(data, [f"distill.{loss}.{key}={text.partition('=')[2]}"])
            continue
        _schema_at(Recipe, parts, text.partition("=")[0])
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                idx = int(part)
                if idx >= len(node):
                    raise RecipeError(f"override '{text}': index {idx} out of range "
                                      f"({'.'.join(parts[:i])} has {len(node)})")
                node = node[idx]
                continue
            if node.get(part) is None:
                node[part] = [] if parts[i + 1].isdigit() else {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last)
            if idx >= len(node):
                raise RecipeError(f"override '{text}': index {idx} out of range")
            node[idx] = value
        else:
            node[last] = value
    return data


# ---------------------------------------------------------------- loading


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping in a recipe file, with a one-line error for a bad file."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{p}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{p}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return dict(data)


def recipe_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Build a validated Recipe from a mapping plus overrides."""
    raw = _merge(to_dict(Recipe()), _legacy_distill(data))
    return build(Recipe, apply_overrides(raw, overrides))


def _warn_legacy(old: str, loss: str, key: str) -> None:
    warnings.warn(f"recipe key distill.{old} is now distill.{loss}.{key} (the loss family's own "
                  f"section); the old key still works", FutureWarning, stacklevel=4)


def _legacy_distill(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` with 0.1's flat ``distill`` keys moved into the loss families' sections."""
    section = data.get("distill")
    if not isinstance(section, Mapping) or not set(section) & set(LEGACY_DISTILL_KEYS):
        return data
    moved = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in section.items()
             if k not in LEGACY_DISTILL_KEYS}
    for old, targets in LEGACY_DISTILL_KEYS.items():
        if old not in section:
            continue
        for loss, key in targets:
            _warn_legacy(old, loss, key)
            sub = moved.setdefault(loss, {})
            if not isinstance(sub, dict):
                raise RecipeError(f"distill.{loss}: expected a mapping, got {sub!r}")
            if key in sub and sub[key] != section[old]:
                raise RecipeError(f"distill.{old}: {section[old]!r} disagrees with "
                                  f"distill.{loss}.{key}: {sub[key]!r} (the same setting; "
                                  f"keep distill.{loss}.{key})")
            sub.setdefault(key, section[old])
    return {**data, "distill": moved}


def _merge(base: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` laid over the defaults: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; the name defaults to the file's stem."""
    data = read_yaml(path)
    data.setdefault("name", Path(path).stem)
    try:
        return recipe_from_dict(data, overrides)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def write_resolved(recipe: Recipe, run_dir: str | os.PathLike | None = None) -> Path:
    """Write the resolved recipe (every default filled in) as ``recipe.yaml`` in the run folder."""
    folder = Path(run_dir) if run_dir is not None else recipe.run_dir
    return atomic_write_text(folder / "recipe.yaml", recipe.to_yaml())
