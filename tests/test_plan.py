"""`ecg-distill plan`: the teacher cache's size estimate against the real cache of the tiny
teacher, the token storage options, a 7B teacher sized from its configuration on the meta
device, and `run` refusing a stage whose disk estimate exceeds the free space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import distill.run.plan as plan_mod
from distill.cli import main
from distill.core.errors import ECGDistillError
from distill.data.tools import write_synthetic
from distill.engine.jobs import build_teacher_cache, load_frozen_teacher, load_job_data
from distill.recipe import load_recipe
from distill.run.pipeline import run_pipeline
from distill.run.plan import (cache_entry_bytes, format_plan, plan_recipe, teacher_shapes,
                              token_option_bytes)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
VLM_RECIPE = REPO / "recipes" / "ptbxl-superdiag-vlm.yaml"


def tiny_overrides(tmp_path: Path) -> list[str]:
    """The quickstart with the tiny VLM teacher used frozen, 60 records, one student."""
    return ["data.synthetic.records=60", f"data.cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'runs'}/{{name}}", "teacher.name_or_path=tiny",
            "teacher.train_mode=frozen", "students=[{family: xresnet1d, size: tiny}]",
            "train.epochs=1", "train.batch_size=16", "quantize.formats=[int8]"]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_token_options_are_the_issue_s_sizes() -> None:
    per = token_option_bytes(576, 4096, d_proj=128)
    assert per == {"fp16": 576 * 4096 * 2, "projected": 576 * 128 * 2,
                   "lead_mean": 12 * 4096 * 2, "int8": 576 * 4096 + 576 * 4}
    assert per["fp16"] * 21837 == pytest.approx(103e9, rel=0.01)  # the issue's 103 GB
    assert per["fp16"] * 800_000 == pytest.approx(3.8e12, rel=0.01)  # and 3.8 TB
    assert token_option_bytes(576, 4096, d_proj=None)["projected"] is None


def test_plan_cache_estimate_is_within_10_percent_of_the_real_cache(tmp_path) -> None:
    recipe = load_recipe(QUICKSTART, tiny_overrides(tmp_path))
    plan = plan_recipe(recipe, records=21837, batches=1)
    stages = {s.stage: s for s in plan.stages}
    assert list(stages) == ["data", "teacher", "teacher_cache", "baseline", "distill",
                            "evaluate", "quantize", "report", "export"]
    text = format_plan(plan)
    for name in ("teacher_cache", "distill", "@21,837", "fp16", "projected", "lead_mean",
                 "int8", "peak memory"):
        assert name in text
    est = stages["teacher_cache"]
    assert est.seconds(60) > 0 and est.memory > 0

    # the real cache of the same teacher on the same records
    jd = load_job_data(recipe, progress=False)
    teacher = load_frozen_teacher(jd, recipe.run_dir)
    cache = build_teacher_cache(jd, teacher, progress=False)
    real = folder_bytes(cache.folder)
    assert len(cache.logits) == plan.records == 60
    assert est.disk(60) == pytest.approx(real, rel=0.10)
    assert sum(cache_entry_bytes(plan.shapes, 60).values()) == pytest.approx(real, rel=0.01)
    assert plan.shapes.tokens == cache.tokens.shape[1] and plan.shapes.dim == cache.tokens.shape[2]
    # extrapolation is linear in the records
    assert est.disk(21837) == pytest.approx(est.disk_per_record * 21837 + est.disk_fixed)
    assert est.disk_per_record * 21837 > est.disk(60) * 300


def test_a_7b_vlm_teacher_is_sized_from_its_configuration(tmp_path) -> None:
    recipe = load_recipe(VLM_RECIPE, [f"data.path={tmp_path}"])
    shapes = teacher_shapes(recipe, 5)
    assert (shapes.tokens, shapes.dim, shapes.pooled) == (576, 4096, 4096)
    assert len(shapes.token_leads) == 576 and set(shapes.token_leads) <= set(range(-1, 12))
    assert "published configuration" in shapes.source
    per = sum(cache_entry_bytes(shapes, 21837).values())
    assert per == pytest.approx(103e9, rel=0.01)


def test_plan_command_on_the_vlm_recipe_with_a_stand_in_folder(tmp_path, capsys) -> None:
    write_synthetic(tmp_path / "ptbxl", records=40, seed=0, sampling_rates=(100,),
                    progress=False)
    rc = main(["plan", str(VLM_RECIPE), f"data.path={tmp_path / 'ptbxl'}",
               f"data.cache_dir={tmp_path / 'cache'}", "students=[{family: xresnet1d, size: tiny}]",
               "--records", "21837", "--batches", "1", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "40 records in the recipe's data set, extrapolated to 21,837" in out
    assert "meta device: 7,06" in out  # 7.06 B parameters
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for stage in ("data", "teacher", "teacher_cache", "baseline", "distill", "evaluate"):
        assert stage in lines
    assert "103 GB" in lines["teacher_cache"] and "FLOPs" in lines["teacher_cache"]
    assert "103 GB" in lines["fp16"] and "51.6 GB" in lines["int8"]  # float32 scales
    assert "2.15 GB" in lines["lead_mean"] and "3.22 GB" in lines["projected"]


def test_run_refuses_a_stage_that_does_not_fit_and_deletes_nothing(tmp_path, monkeypatch,
                                                                   capsys) -> None:
    overrides = tiny_overrides(tmp_path)
    recipe = load_recipe(QUICKSTART, overrides)
    run_pipeline(recipe, progress=False, stages=("data",))
    marker = recipe.run_dir / "stages" / "data.json"
    assert marker.exists()
    cached = {p: p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file()}

    monkeypatch.setattr(plan_mod, "free_bytes", lambda path: 10_000)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe.to_yaml())
    # --force data would delete the data stage's results: refused before that
    assert main(["run", str(recipe_file), "--force", "data", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("error: stage data: needs about ") and "10 KB is free" in err
    assert "data.cache_dir" in err
    assert marker.exists()
    assert all(p.exists() and p.stat().st_size == size for p, size in cached.items())

    # the data stage complete: the teacher cache is the one refused, naming its size
    with pytest.raises(ECGDistillError) as info:
        run_pipeline(recipe, progress=False, stages=("data", "teacher", "teacher_cache"))
    msg = str(info.value)
    assert msg.startswith("stage teacher_cache: needs about ") and "\n" not in msg
    shapes = teacher_shapes(recipe, 5)
    need = sum(cache_entry_bytes(shapes, 60).values())
    assert plan_mod.format_bytes(need) in msg
    assert "data.cache_dir" in msg and "ecg-distill plan" in msg
    assert not list((tmp_path / "cache").glob("teacher-outputs-*"))
    assert json.loads(marker.read_text())["stage"] == "data"
    assert all(p.exists() and p.stat().st_size == size for p, size in cached.items())
