"""PTB-XL database and statements, and the benchmark's label aggregation and folds.

Implements the label side of the PTB-XL benchmark (Strodthoff et al. 2020, "Deep learning
for ECG analysis: benchmarks and insights from PTB-XL"; reference functions
``compute_label_aggregations`` and ``select_data``):

- a record's statements are the keys of its ``scp_codes`` dict; the likelihood value is
  ignored (a code listed with likelihood 0 still counts as positive);
- ``diagnostic``: the codes with ``diagnostic == 1`` in ``scp_statements.csv``;
  ``subdiagnostic`` / ``superdiagnostic``: their ``diagnostic_subclass`` /
  ``diagnostic_class`` (NaN ones skipped); ``form`` / ``rhythm``: the codes flagged so;
  ``all``: every code listed in ``scp_statements.csv`` (on PTB-XL every code is listed, so
  this equals the benchmark's "all keys");
- for every task but ``diagnostic`` a class is kept only if more than ``min_samples``
  records carry it (``counts > min_samples``, exactly as ``select_data``; the benchmark
  applies no such filter to ``diagnostic``, and neither does this);
- records left with no label for the task are dropped;
- classes are sorted, as ``MultiLabelBinarizer`` sorts them.
"""

from __future__ import annotations

import ast
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from distill.core.errors import DataError

TASKS: tuple[str, ...] = ("all", "diagnostic", "subdiagnostic", "superdiagnostic", "form", "rhythm")
DATABASE_FILE = "ptbxl_database.csv"
STATEMENTS_FILE = "scp_statements.csv"
DATABASE_COLUMNS = ("scp_codes", "strat_fold")
STATEMENT_COLUMNS = ("diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass")
# The benchmark's split: folds 1-8 train, 9 validation, 10 test (the last two were
# validated by cardiologists, so they hold the most reliable labels).
DEFAULT_FOLDS: dict[str, tuple[int, ...]] = {
    "train": (1, 2, 3, 4, 5, 6, 7, 8), "val": (9,), "test": (10,),
}
# Which sampling rate reads which folder, through which column of the database.
RATE_COLUMNS = {100: ("records100", "filename_lr"), 500: ("records500", "filename_hr")}


def _read_csv(path: Path, index_col: int | None) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        return pd.read_csv(path, index_col=index_col)
    except Exception as e:  # empty or binary garbage
        raise DataError(f"{path}: cannot read as csv ({type(e).__name__}: {e})") from None


def require_columns(df: pd.DataFrame, columns: Sequence[str], path: str | Path) -> None:
    """Raise one DataError naming ``path`` and every column of ``columns`` it lacks."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing required column(s) {', '.join(missing)}")


def _parse_codes(text: object, ecg_id: object, path: Path) -> dict[str, float]:
    try:
        value = ast.literal_eval(text) if isinstance(text, str) else None
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, dict):
        raise DataError(f"{path}: ecg_id {ecg_id}: scp_codes {text!r} is not a dict literal")
    return {str(k): v for k, v in value.items()}


def read_database(root: str | Path) -> pd.DataFrame:
    """Read ``ptbxl_database.csv``: index ``ecg_id``, ``scp_codes`` parsed into dicts.

    Args:
        root: the PTB-XL folder.

    Returns:
        The table, sorted by ``ecg_id``; ``strat_fold`` as int.

    Raises:
        DataError: the file is missing or lacks ``ecg_id``/``scp_codes``/``strat_fold``.
    """
    path = Path(root) / DATABASE_FILE
    db = _read_csv(path, index_col=None)
    require_columns(db, ("ecg_id", *DATABASE_COLUMNS), path)
    db = db.set_index("ecg_id").sort_index()
    db["scp_codes"] = [_parse_codes(t, i, path) for i, t in zip(db.index, db["scp_codes"])]
    folds = pd.to_numeric(db["strat_fold"], errors="coerce")
    if folds.isna().any():
        bad = db.index[folds.isna()][0]
        raise DataError(f"{path}: ecg_id {bad}: strat_fold is not a number")
    db["strat_fold"] = folds.astype(int)
    return db


def read_statements(root: str | Path) -> pd.DataFrame:
    """Read ``scp_statements.csv``: index = the unnamed first column (the SCP code).

    Raises:
        DataError: the file is missing or lacks one of ``STATEMENT_COLUMNS``.
    """
    path = Path(root) / STATEMENTS_FILE
    st = _read_csv(path, index_col=0)
    require_columns(st, STATEMENT_COLUMNS, path)
    st.index = st.index.astype(str)
    return st


def _flagged(statements: pd.DataFrame, column: str) -> pd.DataFrame:
    flags = pd.to_numeric(statements[column], errors="coerce")
    return statements[flags == 1.0]


def label_map(statements: pd.DataFrame, task: str) -> dict[str, str]:
    """SCP code -> the label it contributes to ``task`` (codes contributing none are absent).

    Args:
        statements: ``read_statements`` output.
        task: one of ``TASKS``.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "all":  # record_labels takes every listed code; this names the known ones
        return {c: c for c in statements.index}
    if task in ("form", "rhythm"):
        return {c: c for c in _flagged(statements, task).index}
    diag = _flagged(statements, "diagnostic")
    if task == "diagnostic":
        return {c: c for c in diag.index}
    column = "diagnostic_subclass" if task == "subdiagnostic" else "diagnostic_class"
    # A diagnostic code without a (sub)class contributes nothing, as in the benchmark.
    return {c: str(v) for c, v in diag[column].items()
            if isinstance(v, str) and v.strip() and v != "nan"}


def record_labels(codes: Mapping[str, float], statements: pd.DataFrame, task: str,
                  mapping: Mapping[str, str] | None = None) -> set[str]:
    """The labels of one record for ``task`` (before the ``min_samples`` filter).

    Args:
        codes: the record's ``scp_codes`` (code -> likelihood; the likelihood is ignored).
        statements: ``read_statements`` output.
        task: one of ``TASKS``.
        mapping: ``label_map(statements, task)``, when already computed.
    """
    if task == "all":  # the benchmark: every key of scp_codes, listed in statements or not
        return set(codes)
    mapping = label_map(statements, task) if mapping is None else mapping
    return {mapping[c] for c in codes if c in mapping}


def aggregate_labels(db: pd.DataFrame, statements: pd.DataFrame, task: str,
                     min_samples: int = 0,
                     classes: Sequence[str] | None = None,
                     ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The benchmark's label matrix for ``task``.

    Args:
        db: ``read_database`` output (N records).
        statements: ``read_statements`` output.
        task: one of ``TASKS``.
        min_samples: keep a class only if more than this many records carry it (not
            applied to ``diagnostic``, as in the benchmark).
        classes: use exactly these classes (in this order) instead of the sorted classes
            present, e.g. to reproduce a trained model's label set.

    Returns:
        ``(Y, classes, keep)``: Y float32 [K, C] multi-hot over the kept records, classes
        the C class names (sorted unless given), keep bool [N] marking the K records that
        have at least one label (the others are dropped).
    """
    mapping = label_map(statements, task)
    labels = [record_labels(codes, statements, task, mapping) for codes in db["scp_codes"]]
    return label_sets_matrix(labels, set(mapping.values()), task, min_samples, classes)


def label_sets_matrix(labels: Sequence[set[str]], known: set[str], task: str,
                      min_samples: int = 0, classes: Sequence[str] | None = None,
                      ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The second half of :func:`aggregate_labels`: per-record label sets -> ``(Y, classes,
    keep)`` with the benchmark's ``min_samples`` filter, sorting and dropping of records
    left without a label (also used for CinC records mapped onto SCP statements).

    Args:
        labels: each record's labels for ``task`` (``record_labels`` output).
        known: every label ``task`` can produce (``label_map(...).values()``), so that
            ``classes`` naming a class no record carries is still accepted.
        task, min_samples, classes: as :func:`aggregate_labels`.
    """
    labels = [set(lab) for lab in labels]
    if task != "diagnostic" and classes is None:
        counts = Counter(c for lab in labels for c in lab)
        frequent = {c for c, n in counts.items() if n > min_samples}
        labels = [lab & frequent for lab in labels]
    if classes is None:
        classes = sorted(set().union(*labels)) if labels else []
    else:
        known = set(known).union(*labels)
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise DataError(f"labels {', '.join(unknown)} are not classes of task {task!r} "
                            f"(pick the task the model was trained on)")
        wanted = set(classes)
        labels = [lab & wanted for lab in labels]
    classes = list(classes)
    keep = np.array([len(lab) > 0 for lab in labels], dtype=bool)
    column = {c: j for j, c in enumerate(classes)}
    y = np.zeros((int(keep.sum()), len(classes)), dtype=np.float32)
    for row, lab in enumerate(lab for lab, k in zip(labels, keep) if k):
        for c in lab:
            y[row, column[c]] = 1.0
    return y, classes, keep


def fold_indices(strat_fold: np.ndarray,
                 folds: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Positions of the records of each split.

    Args:
        strat_fold: int [N], each record's fold (1..10 on PTB-XL).
        folds: split name -> the folds it takes (default ``DEFAULT_FOLDS``).

    Returns:
        split name -> int64 positions into ``strat_fold`` (ascending).

    Raises:
        DataError: two splits share a fold.
    """
    folds = dict(DEFAULT_FOLDS if folds is None else folds)
    seen: dict[int, str] = {}
    for name, fs in folds.items():
        for f in fs:
            if int(f) in seen:
                raise DataError(f"fold {f} is in both the {seen[int(f)]} and {name} splits")
            seen[int(f)] = name
    sf = np.asarray(strat_fold)
    return {name: np.flatnonzero(np.isin(sf, [int(f) for f in fs])).astype(np.int64)
            for name, fs in folds.items()}


def record_folder(root: str | Path, sampling_rate: int) -> tuple[Path, str, int]:
    """Which folder and database column serve ``sampling_rate``.

    100 Hz reads ``records100`` (``filename_lr``), 500 Hz ``records500`` (``filename_hr``);
    any other rate reads the nearest folder at or above it (``records100`` up to 100 Hz,
    else ``records500``) and is resampled by the caller.

    Returns:
        ``(folder, column, source_rate)``.

    Raises:
        DataError: the folder is absent.
    """
    if sampling_rate <= 0:
        raise DataError(f"sampling_rate must be positive, got {sampling_rate}")
    source_rate = 100 if sampling_rate <= 100 else 500
    name, column = RATE_COLUMNS[source_rate]
    folder = Path(root) / name
    if not folder.is_dir():
        raise DataError(f"{root}: no {name}/ folder, needed for sampling_rate={sampling_rate} "
                        f"(column {column})")
    return folder, column, source_rate
