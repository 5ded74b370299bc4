"""The data layer: PTB-XL-layout and CinC folders, cached signals, views, synthesis, rendering.

Signals everywhere are float32 [12, T] millivolts in the standard lead order
(``STANDARD_LEADS``). The synthetic generator and the renderer are imported on first use,
so the loaders work without them (and without their dependencies).
"""

from __future__ import annotations

import importlib
from typing import Any

from distill.data.cache import ArrayCache, default_cache_dir, fingerprint
from distill.data.cinc import hash_folds, label_matrix, parse_comments, scan_folder
from distill.data.dataset import (
    BAD_RECORD_MODES,
    SCALERS,
    ECGData,
    ECGSplit,
    Scaler,
    SignalView,
    load_cinc,
    load_ptbxl,
)
from distill.data.leads import NUM_LEADS, STANDARD_LEADS, lead_index, lead_indices, standard_order
from distill.data.ptbxl import (
    DEFAULT_FOLDS,
    TASKS,
    aggregate_labels,
    fold_indices,
    read_database,
    read_statements,
)
from distill.data.records import Record, check_signal, read_record, resample

# name -> module of the helpers imported lazily (PEP 562 module __getattr__).
_LAZY = {
    "generate_ptbxl": "distill.data.synth",
    "RenderConfig": "distill.data.render",
    "render_12lead": "distill.data.render",
    "patch_lead_map": "distill.data.render",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ArrayCache", "default_cache_dir", "fingerprint",
    "hash_folds", "label_matrix", "parse_comments", "scan_folder",
    "BAD_RECORD_MODES", "SCALERS", "ECGData", "ECGSplit", "Scaler", "SignalView",
    "load_cinc", "load_ptbxl",
    "NUM_LEADS", "STANDARD_LEADS", "lead_index", "lead_indices", "standard_order",
    "DEFAULT_FOLDS", "TASKS", "aggregate_labels", "fold_indices", "read_database",
    "read_statements",
    "Record", "check_signal", "read_record", "resample",
    *_LAZY,
]
