"""The data layer: PTB-XL-layout and CinC folders, cached signals, views, synthesis, rendering.

Signals everywhere are float32 [12, T] millivolts in the standard lead order
(``STANDARD_LEADS``). Every name below is imported on first use (PEP 562), so light users
such as the recipe validator (which only needs the lead names) never pay for torch or
pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it
_LAZY = {
    **dict.fromkeys(["ArrayCache", "default_cache_dir", "fingerprint"], "distill.data.cache"),
    **dict.fromkeys(["hash_folds", "label_matrix", "parse_comments", "scan_folder"],
                    "distill.data.cinc"),
    **dict.fromkeys(["BAD_RECORD_MODES", "SCALERS", "ECGData", "ECGSplit", "KeptRows", "PerDraw", "Scaler",
                     "SignalView", "load_cinc", "load_ptbxl"], "distill.data.dataset"),
    **dict.fromkeys(["NUM_LEADS", "STANDARD_LEADS", "lead_index", "lead_indices",
                     "standard_order"], "distill.core.leads"),
    **dict.fromkeys(["DEFAULT_FOLDS", "TASKS", "aggregate_labels", "fold_indices",
                     "read_database", "read_statements"], "distill.data.ptbxl"),
    **dict.fromkeys(["Record", "check_signal", "read_record", "resample"],
                    "distill.data.records"),
    "generate_ptbxl": "distill.data.synth",
    **dict.fromkeys(["RenderConfig", "render_12lead", "render_batch", "patch_lead_map",
                     "cached_images"], "distill.data.render"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = list(_LAZY)
