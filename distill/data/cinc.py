"""PhysioNet/CinC Challenge 2020-2021 folders: ``.hea`` + ``.mat`` records, SNOMED CT labels.

A header carries its labels and demographics as comment lines::

    # Age: 59
    # Sex: Female
    # Dx: 164934002,426783006

The comments are read as plain text (no WFDB parsing), so a cached load of a CinC folder
never calls wfdb. The signals themselves go through :func:`distill.data.records.read_record`
(wfdb reads these MATLAB v4 ``.mat`` files directly, from the header's ``16x1+24`` format).

The challenge data come without folds; :func:`hash_folds` assigns one from the record
name (``load_cinc`` passes the path relative to the folder, e.g. ``g1/HR06000``):
``1 + int(md5(name)[:8], 16) % n_folds``. It depends only on the name, so a record
keeps its fold when records are added or removed and on every machine. The folds are
patient-free only if every record is a different patient: CinC headers name no patient,
so records of one patient (several PTB-XL ecg_ids of one patient_id, for instance) can
fall in different folds.

PTB-XL labels (``data.task`` one of ``ptbxl.TASKS``): :func:`map_to_task` turns a record's
SNOMED codes into SCP-ECG statements through the shipped table ``tables/snomed_scp.csv``
(the challenge's code list with the PTB-XL statements it folded into each code) and then
into the task's classes through :func:`distill.data.ptbxl.label_map`, the same derivation
PTB-XL records go through, with PTB-XL's own ``tables/scp_statements.csv``. A code gives a
label only when every statement behind it gives that same label; otherwise (or when the
code has no statement, or is not in the table) it is *unmapped for the task*: counted and
listed, never silently dropped. Sinus rhythm (426783006, which PTB-XL's NORM and SR both
became) gives its labels only to a record with no other label of the task and no code
unmapped for it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from distill.core.errors import DataError
from distill.data import ptbxl

TABLES = Path(__file__).with_name("tables")
MAPPING_FILE = TABLES / "snomed_scp.csv"  # SNOMED CT -> SCP statements (header names the source)
MAPPING_COLUMNS = ("snomed_code", "abbreviation", "dx", "scp_codes", "rule")
RULES = ("", "alone", "neutral")
SNOMED_TASK = "snomed"  # the raw codes as classes (the default before PTB-XL tasks existed)


def parse_comments(lines: Sequence[str]) -> dict[str, object]:
    """Dx codes, age and sex from a header's comment lines (with or without the ``#``).

    Returns:
        ``{"dx": list[str] (order kept, duplicates dropped), "age": float (NaN when absent or
        "Unknown"), "sex": str ("" when absent)}``.
    """
    out: dict[str, object] = {"dx": [], "age": math.nan, "sex": ""}
    for line in lines:
        key, sep, value = line.lstrip("#").strip().partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "dx":
            codes = [c.strip() for c in value.split(",") if c.strip()]
            out["dx"] = list(dict.fromkeys(codes))
        elif key == "age":
            try:
                out["age"] = float(value)
            except ValueError:  # "Unknown", "NaN"
                out["age"] = math.nan
        elif key == "sex":
            out["sex"] = value if value.lower() not in ("unknown", "nan") else ""
    return out


def read_header_comments(hea: Path, source: str | None = None) -> list[str]:
    """The ``#`` comment lines of a ``.hea`` file, as plain text."""
    try:
        text = hea.read_text(errors="replace")
    except OSError as e:
        raise DataError(f"{source or hea}: cannot read header {hea} ({e.strerror})") from None
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


def scan_folder(folder: str | Path) -> pd.DataFrame:
    """Every record (a ``.hea`` file) under ``folder``, recursively, sorted by relative path.

    Args:
        folder: a CinC-layout folder (``.hea`` + ``.mat`` pairs, in any subfolders).

    Returns:
        A table with one row per record: ``name`` (file stem), ``path`` (record path without
        extension, relative to ``folder``), ``dx`` (list of SNOMED CT code strings), ``age``
        (float, NaN when unknown), ``sex`` (str).

    Raises:
        DataError: the folder does not exist or holds no ``.hea`` file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"CinC folder {folder} does not exist")
    heads = sorted(folder.rglob("*.hea"), key=lambda p: p.relative_to(folder).as_posix())
    if not heads:
        raise DataError(f"{folder}: no .hea record headers found")
    rows = []
    for hea in heads:
        rel = hea.relative_to(folder).with_suffix("").as_posix()
        info = parse_comments(read_header_comments(hea, f"record {rel} ({hea})"))
        rows.append({"name": hea.stem, "path": rel, **info})
    return pd.DataFrame(rows)


def label_matrix(dx: Sequence[Sequence[str]],
                 classes: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Multi-hot SNOMED labels.

    Args:
        dx: per record, its codes.
        classes: the code list to use (in this order); None = the sorted set of codes
            present (codes compared as strings, so sorting is lexicographic).

    Returns:
        ``(Y float32 [N, C], classes)``; codes outside ``classes`` are ignored.
    """
    if classes is None:
        classes = sorted({c for codes in dx for c in codes})
    classes = [str(c) for c in classes]
    column = {c: j for j, c in enumerate(classes)}
    y = np.zeros((len(dx), len(classes)), dtype=np.float32)
    for i, codes in enumerate(dx):
        for c in codes:
            if c in column:
                y[i, column[c]] = 1.0
    return y, classes


def hash_folds(names: Sequence[str], n_folds: int = 10) -> np.ndarray:
    """A deterministic fold 1..n_folds per record name (see the module docstring)."""
    return np.array(
        [1 + int(hashlib.md5(n.encode()).hexdigest()[:8], 16) % n_folds for n in names],
        dtype=np.int64,
    )


@functools.lru_cache(maxsize=4)
def read_mapping(path: str | Path = MAPPING_FILE) -> pd.DataFrame:
    """The SNOMED CT -> SCP table: index ``snomed_code`` (str); ``scp_codes`` a tuple.

    Raises:
        DataError: the file is missing or unreadable, lacks a column, repeats a code, has
            an unknown ``rule`` or names a statement PTB-XL does not have.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, comment="#", dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"missing file {path}") from None
    except Exception as e:
        raise DataError(f"{path}: cannot read as csv ({type(e).__name__}: {e})") from None
    ptbxl.require_columns(table, MAPPING_COLUMNS, path)
    codes = table["snomed_code"].str.strip()
    dup = codes[codes.duplicated()]
    if len(dup):
        raise DataError(f"{path}: snomed_code {dup.iloc[0]} is listed twice")
    statements = set(read_statements().index)
    for code, scp, rule in zip(codes, table["scp_codes"], table["rule"]):
        if rule not in RULES:
            raise DataError(f"{path}: snomed_code {code}: unknown rule {rule!r} "
                            f"(expected one of {', '.join(repr(r) for r in RULES)})")
        bad = [c for c in _split(scp) if c not in statements]
        if bad:
            raise DataError(f"{path}: snomed_code {code}: {', '.join(bad)} not a PTB-XL "
                            f"statement")
    table = table.assign(snomed_code=codes, scp_codes=[_split(v) for v in table["scp_codes"]])
    return table.set_index("snomed_code")


def _split(value: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in str(value).split(";") if c.strip())


@functools.lru_cache(maxsize=1)
def read_statements() -> pd.DataFrame:
    """PTB-XL 1.0.3's ``scp_statements.csv`` as shipped with the package (a CinC folder has
    none): ``ptbxl.read_statements`` output."""
    return ptbxl.read_statements(TABLES)


def code_labels(task: str, table: pd.DataFrame | None = None,
                statements: pd.DataFrame | None = None) -> dict[str, tuple[str, frozenset[str]]]:
    """What each code of the table gives for ``task``: code -> ``(status, labels)``.

    ``status``: ``"label"`` (every statement behind the code gives the same label),
    ``"none"`` (none of them gives a label of this task, e.g. a rhythm code under
    ``superdiagnostic``), ``"alone"`` (the sinus-rhythm rule; labels as the statements
    give them), ``"neutral"`` (no statement, no bar to the rule: heart axis),
    ``"ambiguous"`` (its statements give different labels, or some none) or
    ``"unmapped"`` (no statement).
    """
    table = read_mapping() if table is None else table
    statements = read_statements() if statements is None else statements
    mapping = ptbxl.label_map(statements, task)
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for code, row in table.iterrows():
        scp, rule = row["scp_codes"], row["rule"]
        given = [mapping.get(c) for c in scp]
        if not scp:
            out[code] = ("neutral" if rule == "neutral" else "unmapped", frozenset())
        elif rule == "alone":
            labels = frozenset(g for g in given if g is not None)
            out[code] = ("alone" if labels else "none", labels)
        elif all(g is None for g in given):
            out[code] = ("none", frozenset())
        elif len(set(given)) == 1:
            out[code] = ("label", frozenset(given[:1]))
        else:
            out[code] = ("ambiguous", frozenset())
    return out


def map_to_task(dx: Sequence[Sequence[str]], task: str, table: pd.DataFrame | None = None,
                ) -> tuple[list[set[str]], dict[str, object]]:
    """Each record's labels of a PTB-XL ``task`` from its SNOMED codes, and what could not
    be mapped.

    Args:
        dx: per record, its SNOMED CT codes (strings).
        task: one of ``ptbxl.TASKS``.
        table: :func:`read_mapping` output (default: the shipped table).

    Returns:
        ``(labels, report)``: labels a set per record (before any ``min_samples`` filter);
        report ``{"task", "records", "unmapped": [{"code", "abbreviation", "reason",
        "records"}...] (most records first), "records_with_unmapped"}``. A code is
        unmapped for the task when it is not in the table ("not in the table"), has no
        PTB-XL statement ("no PTB-XL statement") or its statements give different labels
        of the task ("ambiguous for <task>").
    """
    if task not in ptbxl.TASKS:
        raise DataError(f"unknown task {task!r} for CinC labels; expected {SNOMED_TASK} or one "
                        f"of {', '.join(ptbxl.TASKS)}")
    table = read_mapping() if table is None else table
    given = code_labels(task, table)
    reasons = {"unmapped": "no PTB-XL statement", "ambiguous": f"ambiguous for {task}"}
    missing: Counter[str] = Counter()
    why: dict[str, str] = {}
    labels: list[set[str]] = []
    with_unmapped = 0
    for codes in dx:
        found: set[str] = set()
        alone: set[str] = set()
        unmapped = False
        for code in codes:
            status, lab = given.get(code, ("unknown", frozenset()))
            if status == "label":
                found |= lab
            elif status == "alone":
                alone |= lab
            elif status in ("unknown", "unmapped", "ambiguous"):
                unmapped = True
                missing[code] += 1
                why[code] = reasons.get(status, "not in the table")
        if alone and not found and not unmapped:
            found = alone
        with_unmapped += unmapped
        labels.append(found)
    rows = [{"code": c, "abbreviation": str(table.at[c, "abbreviation"]) if c in table.index
             else "", "reason": why[c], "records": n}
            for c, n in sorted(missing.items(), key=lambda kv: (-kv[1], kv[0]))]
    return labels, {"task": task, "records": len(labels), "unmapped": rows,
                    "records_with_unmapped": with_unmapped}


def format_unmapped(report: dict[str, object], limit: int = 20) -> str:
    """The report's unmapped codes as lines ``code (ABBR) in N record(s): reason``."""
    rows = list(report.get("unmapped") or [])
    if not rows:
        return "every SNOMED code mapped"
    lines = [f"{len(rows)} SNOMED code(s) not mapped to task {report['task']} "
             f"({report['records_with_unmapped']} record(s) carry one):"]
    for r in rows[:limit]:
        abbr = f" ({r['abbreviation']})" if r["abbreviation"] else ""
        lines.append(f"  {r['code']}{abbr} in {r['records']} record(s): {r['reason']}")
    if len(rows) > limit:
        lines.append(f"  ... and {len(rows) - limit} more")
    return "\n".join(lines)


def mapping_digest(path: str | Path = MAPPING_FILE) -> str:
    """sha256 of the mapping table's bytes (a data fingerprint enters it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
