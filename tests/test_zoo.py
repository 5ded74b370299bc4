"""Shipped teachers (teachers/zoo): the embedded ecg-vlm-small against its card, checksum
refusals, the generator-version warning, and `zoo pack` on a tiny teacher run."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import distill.data.synth as synth
import distill.run.pipeline as pipeline
from distill.data.load import load_data
import students
import teachers
from distill.core.errors import DataError, RecipeError
from distill.engine.factory import build_teacher
from distill.recipe import load_recipe
from distill.hub.zoo import CHECK_SET, CHECK_TOLERANCE, pack, score_check_set
from teachers import zoo

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
ZOO_RECIPE = REPO / "recipes" / "teacher-zoo" / "ecg-vlm-small.yaml"


@pytest.fixture
def fresh_zoo(monkeypatch):
    """Checks run again in this test (the module caches verified folders per process)."""
    monkeypatch.setattr(zoo, "_checked", set())
    return zoo


# ---------------------------------------------------------------- shipped teachers
# Every teacher under teachers/zoo/ (none is shipped yet: see README, "The embedded teacher").


@pytest.mark.parametrize("name", zoo.names())
def test_shipped_teacher_is_checked_and_scores_its_card(name, fresh_zoo) -> None:
    folder = zoo.folder(name)
    info = zoo.card(name)
    assert info["files"] == zoo.file_hashes(folder)  # every file matches its SHA-256
    assert info["corpus"]["generator_version"] == synth.GENERATOR_VERSION
    with safe_open(str(folder / "backbone" / "model.safetensors"), "pt") as f:
        # every floating tensor in fp16; integer buffers (batch norm's step count) stay
        assert {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64"} == {"F16"}
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 25e6
    teacher = teachers.load(folder, train_mode="frozen")
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert n_teacher == info["model"]["parameters"]
    quick = load_recipe(QUICKSTART)
    largest = max(sum(p.numel() for p in students.create(
        s.family, s.size, num_labels=5, sampling_rate=100).parameters())
        for s in quick.students)
    assert n_teacher >= 10 * largest
    auc = score_check_set(teacher, info)
    assert abs(auc - info["check_set"]["macro_auc"]) <= CHECK_TOLERANCE


def test_names_outside_the_zoo_resolve_to_nothing() -> None:
    assert zoo.folder("tiny") is None and zoo.folder("../zoo") is None
    assert zoo.folder("") is None and zoo.folder("no-such-teacher") is None


def test_zoo_corpus_shares_no_seed_or_patient_with_the_quickstart_or_check_set() -> None:
    quick, zoo_recipe = load_recipe(QUICKSTART), load_recipe(ZOO_RECIPE)
    q, z = quick.data.synthetic, zoo_recipe.data.synthetic
    q_lo, q_hi = synth.patient_id_range(q.records, q.first_patient_id)
    z_lo, z_hi = synth.patient_id_range(z.records, z.first_patient_id)
    c_lo, c_hi = synth.patient_id_range(CHECK_SET["records"], CHECK_SET["first_patient_id"])
    assert q_hi < z_lo and z_hi < c_lo
    assert len({q.seed, z.seed, CHECK_SET["seed"]}) == 3


def test_first_patient_id_shifts_ids_and_nothing_else() -> None:
    a_sig, a = synth.synthesize(30, seed=3)
    b_sig, b = synth.synthesize(30, seed=3, first_patient_id=5001)
    np.testing.assert_array_equal(a_sig, b_sig)
    np.testing.assert_array_equal(b["patient_id"].to_numpy(), a["patient_id"].to_numpy() + 5000)
    lo, hi = synth.patient_id_range(30, 5001)
    assert lo <= b["patient_id"].min() and b["patient_id"].max() <= hi


# ---------------------------------------------------------------- zoo pack


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny teacher trained by the zoo recipe (shrunk) and packed into a zoo folder."""
    tmp = tmp_path_factory.mktemp("zoo")
    recipe = load_recipe(ZOO_RECIPE, [
        "data.synthetic.records=150", f"data.cache_dir={tmp / 'cache'}",
        f"output_dir={tmp / 'runs'}/{{name}}", "teacher.name_or_path=tiny-swin",
        "teacher.epochs=1", "teacher.batch_size=16", "train.checkpoint_every=null"])
    pipeline.run_pipeline(recipe, progress=False, stages=("data", "teacher"))
    out = tmp / "zoo" / "little"
    info = pack(recipe, "little.yaml", name="little", out=out, progress=False)
    return recipe, out, info


def test_pack_writes_a_checked_fp16_teacher_with_its_card(packed) -> None:
    recipe, out, info = packed
    assert info == json.loads((out / zoo.CARD_FILE).read_text())
    assert info["files"] == zoo.file_hashes(out)
    zoo.verify(out)
    assert set(info["results"]) == {"val", "test"}
    assert info["results"]["test"]["records"] == len(load_data(
        recipe.data, progress=False).splits["test"])
    assert info["corpus"]["patient_ids"][0] == 100001
    assert info["command"].startswith("ecg-distill teacher little.yaml")
    assert info["runs"][0]["train_seconds"] > 0
    text = (out / "README.md").read_text()
    assert info["files"]["backbone/model.safetensors"] in text
    assert json.loads((out / "teacher.json").read_text())["source"] == "little"
    with safe_open(str(out / "backbone" / "model.safetensors"), "pt") as f:
        # every floating tensor in fp16; integer buffers (batch norm's step count) stay
        assert {f.get_slice(k).get_dtype() for k in f.keys()} - {"I64"} == {"F16"}
    reloaded = teachers.load(out, train_mode="frozen")
    assert score_check_set(reloaded, info) == pytest.approx(info["check_set"]["macro_auc"],
                                                              abs=1e-6)


def test_pack_refuses_to_overwrite_and_needs_a_trained_run(packed, tmp_path) -> None:
    recipe, out, _ = packed
    with pytest.raises(RecipeError, match="exists; pass --force"):
        pack(recipe, "little.yaml", name="little", out=out, progress=False)
    empty = load_recipe(ZOO_RECIPE, [f"output_dir={tmp_path}/{{name}}"])
    with pytest.raises(RecipeError, match="no complete teacher run"):
        pack(empty, "r.yaml", out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_a_recipe_names_a_zoo_teacher_and_its_adapted_head_reloads(packed, fresh_zoo,
                                                                   monkeypatch, tmp_path) -> None:
    recipe, out, _ = packed
    monkeypatch.setattr(zoo, "ZOO_DIR", out.parent)
    use = load_recipe(QUICKSTART, ["teacher.name_or_path=little", "teacher.train_mode=head",
                                   f"data.cache_dir={tmp_path / 'cache'}"])
    classes = list(teachers.load(out, train_mode="frozen").id2label.values())
    model = build_teacher(use, classes)
    assert model.train_mode == "head" and model.source == "little"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight",
                                                                            "head.bias"}
    with torch.no_grad():
        model.head.weight.add_(0.5)  # an adapted head
    model.save_pretrained(tmp_path / "best")
    assert not (tmp_path / "best" / "backbone").exists()  # the backbone comes from the zoo
    again = teachers.load(tmp_path / "best", train_mode="frozen")
    image = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(again(image=image).logits, model.eval()(image=image).logits)
    wrong = load_recipe(QUICKSTART, ["teacher.name_or_path=little", "data.image.height=112",
                                     "data.image.width=112"])
    with pytest.raises(RecipeError, match="render at height=224"):
        build_teacher(wrong, classes)


# ---------------------------------------------------------------- refusals


def _copy(packed, tmp_path: Path) -> Path:
    return Path(shutil.copytree(packed[1], tmp_path / "little"))


def test_a_changed_missing_or_extra_file_is_refused_by_name(packed, tmp_path) -> None:
    folder = _copy(packed, tmp_path)
    head = folder / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"head\.safetensors: SHA-256 .* differs"):
        zoo.verify(folder)
    head.unlink()
    with pytest.raises(DataError, match=r"head\.safetensors: missing"):
        zoo.verify(folder)
    shutil.copy(packed[1] / "head.safetensors", head)
    (folder / "backbone" / "extra.bin").write_bytes(b"x")
    with pytest.raises(DataError, match=r"extra\.bin: not listed"):
        zoo.verify(folder)


def test_a_teacher_of_another_generator_version_warns(packed, tmp_path) -> None:
    folder = _copy(packed, tmp_path)
    card = json.loads((folder / zoo.CARD_FILE).read_text())
    card["corpus"]["generator_version"] = synth.GENERATOR_VERSION - 1
    (folder / zoo.CARD_FILE).write_text(json.dumps(card))
    with pytest.warns(UserWarning, match="generator version"):
        zoo.verify(folder)
    card["corpus"]["generator_version"] = synth.GENERATOR_VERSION
    (folder / zoo.CARD_FILE).write_text(json.dumps(card))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.verify(folder)


def test_a_damaged_zoo_teacher_named_by_a_recipe_stops_with_one_line(packed, fresh_zoo,
                                                                     monkeypatch, tmp_path) -> None:
    folder = _copy(packed, tmp_path)
    (folder / "teacher.json").write_text((folder / "teacher.json").read_text() + " ")
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    recipe = load_recipe(QUICKSTART, ["teacher.name_or_path=little"])
    with pytest.raises(DataError, match=r"little/teacher\.json: SHA-256"):
        build_teacher(recipe, ["CD", "HYP", "MI", "NORM", "STTC"])
