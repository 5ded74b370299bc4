"""The whole pipeline on real records: ``recipes/ptbxl-real-500.yaml``, reduced, on the 500
real PTB-XL records in ``../shared/data/ptbxl-real-500`` (issue 21)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "ptbxl-real-500"


@pytest.mark.skipif(not (REAL / "ptbxl_database.csv").exists(),
                    reason=f"the real PTB-XL subset is not at {REAL} (shared/ beside the "
                           f"repository holds it on the project's machines and in CI)")
def test_the_real_data_recipe_runs_end_to_end(tmp_path: Path) -> None:
    """Teacher, student (baseline and distilled), evaluation, report and export on the real
    folds: 352 / 72 / 64 labelled records, PTB-XL's five superclasses."""
    from distill.recipe import load_recipe
    from distill.run.pipeline import run_pipeline

    recipe = load_recipe(REPO / "recipes" / "ptbxl-real-500.yaml", [
        f"data.path={REAL}", f"data.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'runs'}/{{name}}", "teacher.epochs=1", "train.epochs=1",
        "students=[{family: xresnet1d, size: tiny}]", "quantize.formats=[]",
        "evaluate.bootstrap=20"])
    run_pipeline(recipe, progress=False)
    run = recipe.run_dir
    data = json.loads((run / "stages" / "data.json").read_text())["summary"]
    assert data["splits"] == {"train": 352, "val": 72, "test": 64}
    assert data["classes"] == ["CD", "HYP", "MI", "NORM", "STTC"]
    results = json.loads((run / "results.json").read_text())
    assert results["test_records"] == 64
    assert {m["kind"] for m in results["models"].values()} >= {"teacher", "baseline", "distill"}
    assert "Teacher: vlm `ecg-vlm-small`" in (run / "report.md").read_text()
    exported = [p for p in (run / "export").iterdir() if p.is_dir()]
    assert exported and all((p / "model.safetensors").exists() for p in exported)
