"""A run's results: ``results.json`` (the evaluate stage) merged with ``quantized.json``
(the quantize stage), the single source of the report and of every export."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distill.core.errors import ECGDistillError
from distill.core.io import atomic_write_text
from distill.core.layout import RunLayout


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    return atomic_write_text(RunLayout(run_dir).results_file, json.dumps(results, indent=1))


def load_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``results.json`` of a run, with the quantize stage's variants (``quantized.json``)
    merged into ``models`` and its other entries under ``quantization``; the fp32 figures
    of the quantize stage (measured beside the variants) stay under
    ``quantization.reference``."""
    layout = RunLayout(run_dir)
    path = layout.results_file
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ECGDistillError(f"{path}: no results; run `ecg-distill run` (its evaluate "
                              f"stage) on the recipe first") from None
    except json.JSONDecodeError as exc:
        raise ECGDistillError(f"{path}: not valid JSON ({exc})") from None
    qpath = layout.quantized_file
    if qpath.exists():
        quantized = json.loads(qpath.read_text())
        results["models"].update(quantized.pop("models", {}))
        results["quantization"] = quantized
    return results
