"""Portable student folders: the student's modelling and configuration code shipped beside
its weights, so the folder loads where only ``torch`` and ``transformers`` are installed::

    AutoModel.from_pretrained(folder, trust_remote_code=True)

:func:`modeling_source` assembles one self-contained file, ``modeling_ecg_student.py``,
from the modules a family is defined in (the project modules its module imports, found
from its import statements, dependencies first: for a signal family the errors and lead
names of ``distill.core``, the output contract, ``students._common``; an image family adds
the renderer's layout and ``students._image``; then the family's module), taking
each module's top-level statements as they are written, and leaving out:

* imports of the project's own modules (their names are defined earlier in the file);
* the registry calls: ``register_family(...)`` and the ``@register_preset`` builders (and
  a private helper such as ``_create_<family>`` that only they call), which only matter
  inside ecg-distill;
* ``__all__``.

The third-party imports of every module are gathered at the top. A name defined twice
(two modules with the same top-level name) is refused: the file would silently keep the
last one. :func:`write_portable` writes the file and adds ``auto_map`` to ``config.json``
so transformers finds the classes in it. Where ecg-distill is installed, a plain
``AutoModel.from_pretrained(folder)`` keeps using the installed classes.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModel

import students  # noqa: F401  (registers the student classes with AutoConfig / AutoModel)
from distill.core.errors import ECGDistillError

MODELING_FILE = "modeling_ecg_student.py"
PROJECT_PACKAGES = ("distill", "students", "teachers")
# project modules a family's file never needs: the registry (its calls are left out)
NOT_SHIPPED = ("students._registry",)
REGISTRY_CALLS = ("register_family",)
REGISTRY_DECORATORS = ("register_preset",)


def _is_project(module: str | None) -> bool:
    return bool(module) and module.split(".")[0] in PROJECT_PACKAGES


def _decorator_name(node: ast.expr) -> str:
    target = node.func if isinstance(node, ast.Call) else node
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def _pieces(module_name: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(third-party import lines, [(defined name or "", source text)]) of one module."""
    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    lines = source.splitlines()
    tree = ast.parse(source)
    imports: list[str] = []
    kept: list[tuple[str, str]] = []
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the module docstring
    removed_builders: set[str] = set()
    for node in body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        text = "\n".join(lines[start - 1:node.end_lineno])
        if isinstance(node, ast.ImportFrom):
            if node.module == "__future__" or _is_project(node.module):
                continue
            imports.append(text)
        elif isinstance(node, ast.Import):
            if not any(_is_project(a.name) for a in node.names):
                imports.append(text)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                _decorator_name(node.value) in REGISTRY_CALLS:
            continue
        elif isinstance(node, ast.FunctionDef) and any(
                _decorator_name(d) in REGISTRY_DECORATORS for d in node.decorator_list):
            removed_builders |= {n.func.id for n in ast.walk(node)
                                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__"
                                                  for t in node.targets):
            continue
        else:
            name = getattr(node, "name", "")
            if not name and isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                name = ",".join(getattr(t, "id", "") for t in targets)
            kept.append((name, text))
    # a private helper (``_create_<family>``) that only the removed presets call goes too;
    # anything else they call (a model class ...) stays
    unused = {name for name in removed_builders if name.startswith("_") and not any(
        re.search(rf"\b{re.escape(name)}\b", text) for n, text in kept if n != name)}
    kept = [(n, t) for n, t in kept if n not in unused]
    return imports, kept


def _project_imports(module_name: str) -> list[str]:
    """The project modules ``module_name`` imports at module level, in order."""
    module = importlib.import_module(module_name)
    tree = ast.parse(inspect.getsource(module))
    out: list[str] = []
    for node in tree.body:
        names = ([node.module] if isinstance(node, ast.ImportFrom) else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            if _is_project(name) and name not in NOT_SHIPPED and name not in out:
                out.append(name)
    return out


def shipped_modules(family_module: str) -> list[str]:
    """Every project module a family's file needs, dependencies first, the family's own
    module last (e.g. errors, leads, contract, ``students._common``, ``students.xresnet1d``)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ECGDistillError(f"portable code: import cycle {' -> '.join(path + (name,))}")
        for dep in _project_imports(name):
            visit(dep, path + (name,))
        order.append(name)

    visit(family_module, ())
    return order


def modeling_source(family_module: str) -> str:
    """The text of ``modeling_ecg_student.py`` for the family defined in ``family_module``
    (e.g. ``students.xresnet1d``).

    Raises:
        ECGDistillError: two modules define the same top-level name.
    """
    imports: list[str] = []
    parts: list[str] = []
    defined: dict[str, str] = {}
    for name in shipped_modules(family_module):
        mod_imports, kept = _pieces(name)
        imports += [i for i in mod_imports if i not in imports]
        parts.append(f"# ---- from {name}")
        for symbol, text in kept:
            for s in filter(None, symbol.split(",")):
                if s in defined:
                    raise ECGDistillError(f"portable code: {s} is defined in both "
                                          f"{defined[s]} and {name}")
                defined[s] = name
            parts.append(text)
    head = ('"""ecg-distill student, self-contained (made by distill.hub.portable): load with\n'
            'AutoModel.from_pretrained(folder, trust_remote_code=True); needs torch and\n'
            'transformers only."""\n\nfrom __future__ import annotations\n')
    return head + "\n" + "\n".join(imports) + "\n\n\n" + "\n\n\n".join(parts) + "\n"


def write_portable(folder: str | Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``modeling_ecg_student.py`` into a saved student folder and point
    ``config.json``'s ``auto_map`` at its classes; the updated config."""
    folder = Path(folder)
    config = config if config is not None else json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    try:  # the classes the installed students registered for this model type
        blank = AutoConfig.for_model(model_type)
        model_class = AutoModel._model_mapping[type(blank)]
    except (ValueError, KeyError):
        raise ECGDistillError(f"{folder / 'config.json'}: model_type {model_type!r} is not a "
                              f"student family of this ecg-distill") from None
    config_class = type(blank)
    if not _is_project(model_class.__module__):
        raise ECGDistillError(f"{folder}: {model_class.__name__} is not an ecg-distill student")
    (folder / MODELING_FILE).write_text(modeling_source(model_class.__module__))
    stem = MODELING_FILE[:-3]
    config["auto_map"] = {"AutoConfig": f"{stem}.{config_class.__name__}",
                          "AutoModel": f"{stem}.{model_class.__name__}"}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config
