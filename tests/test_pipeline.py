"""The run pipeline (stages, resume, --force, --dry-run) and the data commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import wfdb
import yaml

import distill.data.synth as synth
import distill.data.tools as data_tools
import distill.run.pipeline as pipeline
import distill.run.stages.data as data_stage
from distill.data.load import load_data, synthetic_folder
from distill.cli import main
from distill.core.errors import DataError, RecipeError
from distill.engine.factory import consumer_views
from distill.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
REAL_PTBXL = REPO / "tests" / "data" / "real-ecg" / "ptbxl-100hz" / "00001_lr"
DATA = ("data",)  # the data stage alone (training stages are tested in test_train.py)


@pytest.fixture
def recipe(tmp_path: Path):
    """The quickstart recipe shrunk to 60 synthetic records, everything under tmp_path."""
    return load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "data.synthetic.records=60", f"data.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'runs'}/{{name}}", "data.image.height=112",
        "data.image.width=112"])


def test_run_generates_loads_renders_and_resumes(recipe, tmp_path, monkeypatch, capsys) -> None:
    plan = pipeline.run_pipeline(recipe, progress=False, stages=DATA)
    assert plan == {"data": "run"}
    run_dir = tmp_path / "runs" / "quickstart"
    marker = json.loads((run_dir / "stages" / "data.json").read_text())
    summary = marker["summary"]
    assert summary["records"] == 60 and summary["classes"] == ["CD", "HYP", "MI", "NORM", "STTC"]
    assert sum(summary["splits"].values()) == 60
    assert summary["images"]["shape"] == [60, 3, 112, 112]
    assert load_recipe(run_dir / "recipe.yaml") == recipe
    # the synthetic set was generated once, in the cache, in the PTB-XL layout
    folder = synthetic_folder(recipe.data)
    assert (folder / "ptbxl_database.csv").exists() and (folder / "records100").is_dir()

    # a complete stage is skipped: nothing is generated or loaded again
    def boom(*_a, **_k):
        raise AssertionError("stage should have been skipped")

    monkeypatch.setattr(data_stage, "load_data", boom)
    assert pipeline.run_pipeline(recipe, progress=False, stages=DATA) == {"data": "skip"}
    assert "[data] complete, skipped" in capsys.readouterr().out
    # --force redoes it
    with pytest.raises(AssertionError, match="should have been skipped"):
        pipeline.run_pipeline(recipe, force=["data"], progress=False, stages=DATA)


def test_changed_section_makes_stage_stale_and_keeps_old_recipe(recipe, tmp_path) -> None:
    pipeline.run_pipeline(recipe, progress=False, stages=DATA)
    changed = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "data.synthetic.records=60", f"data.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'runs'}/{{name}}", "data.image.height=112",
        "data.image.width=112", "data.task=rhythm"])
    assert pipeline.stage_status(pipeline.STAGES[0], changed, changed.run_dir) == "stale"
    assert pipeline.run_pipeline(changed, dry_run=True, progress=False,
                                 stages=DATA) == {"data": "run"}
    pipeline.run_pipeline(changed, progress=False, stages=DATA)
    marker = json.loads((changed.run_dir / "stages" / "data.json").read_text())
    assert marker["summary"]["task"] == "rhythm"
    assert "SR" in marker["summary"]["classes"]
    # the earlier resolved recipe was kept, not overwritten
    assert load_recipe(changed.run_dir / "recipe.1.yaml") == recipe
    assert load_recipe(changed.run_dir / "recipe.yaml") == changed


def test_dry_run_does_nothing(recipe, tmp_path, capsys) -> None:
    plan = pipeline.run_pipeline(recipe, dry_run=True, progress=False)
    assert plan == {name: "run" for name in pipeline.STAGE_NAMES}
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
    out = capsys.readouterr().out
    assert "data          run   (todo)" in out and "distill       run   (todo)" in out


def test_unknown_forced_stage_is_refused(recipe) -> None:
    with pytest.raises(RecipeError, match=r"--force: unknown stage 'dat'; did you mean 'data'\?"):
        pipeline.run_pipeline(recipe, force=["dat"], progress=False)


def test_missing_data_path_is_one_line(recipe, tmp_path) -> None:
    recipe.data.path = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"data.path: folder .*nowhere does not exist"):
        pipeline.run_pipeline(recipe, progress=False, stages=DATA)


def test_synth_command_refuses_to_overwrite_and_replaces_atomically(tmp_path, monkeypatch,
                                                                     capsys) -> None:
    out = tmp_path / "syn"
    assert main(["data", "synth", str(out), "--records", "25", "--rates", "100", "--quiet"]) == 0
    assert "wrote 25 records" in capsys.readouterr().out
    before = (out / "ptbxl_database.csv").read_bytes()
    # without --force: one-line error, nothing touched
    assert main(["data", "synth", str(out), "--records", "30", "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {out}: folder is not empty; pass --force to replace it\n"
    # a generation that fails half-way leaves the old set intact
    real = synth.generate_ptbxl

    def failing(path, *args, **kwargs):
        real(path, 5, seed=3, sampling_rates=(100,), progress=False)
        raise KeyboardInterrupt

    monkeypatch.setattr(data_tools, "generate_ptbxl", failing)
    assert main(["data", "synth", str(out), "--records", "30", "--force", "--quiet"]) == 130
    assert (out / "ptbxl_database.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no temporary folder left
    monkeypatch.setattr(data_tools, "generate_ptbxl", real)
    assert main(["data", "synth", str(out), "--records", "30", "--rates", "100", "--force",
                 "--quiet"]) == 0
    assert (out / "ptbxl_database.csv").read_bytes() != before


def test_synthetic_set_loads_for_superdiagnostic_with_exact_limb_leads(tmp_path) -> None:
    """The done-when of the data layer, small: synth, then load for superdiagnostic."""
    from distill.data.dataset import SignalView, load_ptbxl

    synth.generate_ptbxl(tmp_path / "s", 120, seed=5, progress=False)
    for rate in (100, 500):
        data = load_ptbxl(tmp_path / "s", task="superdiagnostic", sampling_rate=rate,
                          cache_dir=tmp_path / "c", progress=False)
        assert data.classes == ["CD", "HYP", "MI", "NORM", "STTC"]
        assert data.store.shape[1:] == (12, 10 * rate)
        sig = data.signal(0).astype(np.float64)  # I, II, III, aVR, aVL, aVF, ...
        np.testing.assert_allclose(sig[2], sig[1] - sig[0], atol=1e-6)
        np.testing.assert_allclose(sig[3], -(sig[0] + sig[1]) / 2, atol=1e-6)
    item = data.split("train", {"teacher": SignalView(), "student": SignalView(("I",), 50)})[0]
    assert item["teacher"].shape == (12, 5000) and item["student"].shape == (1, 500)


def test_render_command_reads_real_record(tmp_path, capsys) -> None:
    out = tmp_path / "ecg.png"
    assert main(["data", "render", str(REAL_PTBXL), "--out", str(out), "--height", "224",
                 "--width", "224"]) == 0
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (224, 224)
    assert main(["data", "render", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in capsys.readouterr().err


def test_gallery_has_one_single_class_record_per_class(tmp_path) -> None:
    from distill.data.ptbxl import read_statements, record_labels
    from distill.data.tools import gallery, gallery_picks

    synth.generate_ptbxl(tmp_path / "s", 150, seed=2, sampling_rates=(100,), progress=False)
    picks = gallery_picks(tmp_path / "s")
    assert [name for name, _row in picks] == ["CD", "HYP", "MI", "NORM", "STTC"]
    statements = read_statements(tmp_path / "s")
    for name, row in picks:
        assert record_labels(row["scp_codes"], statements, "superdiagnostic") == {name}
    assert len({row.name for _name, row in picks}) == len(picks)
    # only 100 Hz records here: the gallery reads those
    out = gallery(tmp_path / "s", tmp_path / "g.png", size=112)
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[0] > 300


def test_cinc_folder_runs_through_the_pipeline(tmp_path) -> None:
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "data.format=cinc", f"data.path={REPO / 'tests/data/real-ecg/cinc2021-ptbxl-500hz'}",
        "data.task=snomed",  # the raw codes as classes (a PTB-XL task maps them: test_cinc_labels)
        f"data.cache_dir={tmp_path / 'cache'}", "data.scaler=none", "data.min_samples=1"])
    data = load_data(recipe.data, progress=False)
    assert data.task == "snomed" and data.store.shape[1:] == (12, 1000)
    # min_samples=1 keeps only the SNOMED codes that more than one record carries
    assert (data.labels.sum(axis=0) > 1).all()
    assert set(data.classes) < {c for dx in (data.info["dx"]) for c in dx}


def test_views_follow_the_recipe(recipe) -> None:
    recipe.data.leads = ["I", "II"]
    recipe.students[0].view.leads = ["I"]
    recipe.students[0].view.sampling_rate = 50
    views = consumer_views(recipe)
    assert views["teacher"].leads == ("I", "II") and views["teacher"].sampling_rate == 100
    assert views["student:xresnet1d/tiny"].leads == ("I",)
    assert views["student:xresnet1d/tiny"].sampling_rate == 50
    assert views["student:xresnet1d/small"].leads == ("I", "II")
    pipeline.run_pipeline(recipe, progress=False, stages=DATA)
    summary = json.loads((recipe.run_dir / "stages" / "data.json").read_text())["summary"]
    assert summary["views"]["student:xresnet1d/tiny"] == [1, 500]
    assert summary["views"]["teacher"] == [2, 1000]


def test_data_info_prints_split_table(recipe, tmp_path) -> None:
    args = ["data", "info", str(REPO / "recipes" / "quickstart.yaml"), "data.synthetic.records=60",
            f"data.cache_dir={tmp_path / 'cache'}", "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "distill", *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["class", "train", "val", "test"]
    records = [int(x) for x in lines[2].split()[1:]]
    assert sum(records) == 60 and all(r > 0 for r in records)
    header = wfdb.rdheader(str(synthetic_folder(load_recipe(
        REPO / "recipes" / "quickstart.yaml", args[3:5]).data) / "records100" / "00000"
        / "00001_lr"))
    assert header.fs == 100 and header.sig_name[3] == "AVR"


@pytest.mark.parametrize("recipe_path", sorted([*(REPO / "recipes").glob("*.yaml"),
                                        *(REPO / "recipes" / "teacher-zoo").glob("*.yaml")]),
                         ids=lambda p: p.name)
def test_every_shipped_recipe_dry_runs(recipe_path: Path, tmp_path: Path, capsys) -> None:
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path}/{{name}}"])
    plan = pipeline.run_pipeline(recipe, dry_run=True, progress=False)
    assert set(plan) == {s.name for s in pipeline.STAGES}
    assert f"run folder: {tmp_path}/{recipe.name}" in capsys.readouterr().out
    assert not (tmp_path / recipe.name).exists()  # a dry run writes nothing


def test_stage_hashes_of_the_quickstart_are_those_of_0_1() -> None:
    """Runs made before the layering (0.1: the flat ``distill`` section, the monolithic
    pipeline) keep their stage hashes, so their folders resume with nothing redone. The
    values are the markers of a quickstart run made with 0.1 (e787dac), whose quantize
    formats were int8 and nf4 (the ONNX formats joined the default later, which rightly
    redoes the quantize, report and export stages of such a folder)."""
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "quantize.formats=[int8, nf4]",
        "distill.mhca.teacher_rank=0"])  # 0.6's quickstart learns mhca's keys in 32 dims
    made_by_0_1 = {"data": "3cf2b7999244132b", "teacher": "219ba5c454b52e61",
                   "teacher_cache": "219ba5c454b52e61", "baseline": "a165ecd7d039202d",
                   "distill": "c5392016d2db5714", "ablation": "c57eaba144f2e940",
                   "evaluate": "85de39e53b5ac3b5", "quantize": "ce1564251b501e31",
                   "report": "ce1564251b501e31", "export": "79a2682b72a409df"}
    assert {s.name: pipeline.stage_hash(s, recipe) for s in pipeline.STAGES} == made_by_0_1


def test_a_0_1_recipe_yaml_that_says_the_same_is_rewritten_not_kept(tmp_path) -> None:
    """A 0.1 run folder's recipe.yaml (flat distill keys) is the same recipe: rewritten in the
    current layout with no recipe.1.yaml; a different one is still kept."""
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [  # as 0.1 could write it
        f"output_dir={tmp_path}", "distill.mhca.teacher_rank=0"])
    old = recipe.to_dict()
    d = old["distill"]
    old["distill"] = {"alpha": d["alpha"], "weights": d["weights"],
                      "temperature": d["kd"]["temperature"], "ot_reg": d["ot"]["reg"],
                      "align_dim": d["mhca"]["dim"]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    pipeline.write_run_recipe(recipe, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    assert (tmp_path / "recipe.yaml").read_text() == recipe.to_yaml()
    changed = load_recipe(REPO / "recipes" / "quickstart.yaml",
                          [f"output_dir={tmp_path}", "distill.mhca.teacher_rank=0",
                           "distill.alpha=0.3"])
    pipeline.write_run_recipe(changed, tmp_path)
    assert (tmp_path / "recipe.1.yaml").read_text() == recipe.to_yaml()
