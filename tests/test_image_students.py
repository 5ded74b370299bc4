"""Image and VLM students through the whole pipeline (issue 18): a VLM teacher distilled
into a VLM student of another tower, token count and width (trained with LoRA) and into
a ViT trained on perturbed printouts; the stress evaluation, quantization and export of
both; and what the families promise on their own (token leads, input errors, a student
started from an image-text-to-text checkpoint, LoRA merged on save)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from transformers import AutoModel

import students
import teachers
from conftest import run_card_snippet
from distill.cli import main
from distill.compress.onnx import read_contract
from distill.data.perturb import STRESS_SET
from distill.data.render_layout import RenderConfig, patch_lead_map
from distill.engine.factory import student_inputs
from distill.engine.jobs import student_train_inputs
from distill.recipe import StudentConfig, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
RECORD = REPO / "tests" / "data" / "real-ecg" / "ptbxl-100hz" / "00001_lr"


def image_recipe(root: Path) -> Path:
    d = {
        "name": "img",
        "output_dir": str(root / "runs" / "{name}"),
        "data": {"synthetic": {"records": 90, "seed": 3}, "cache_dir": str(root / "cache")},
        "teacher": {"kind": "vlm", "name_or_path": "tiny", "train_mode": "full", "epochs": 1},
        "students": [{"family": "llava", "size": "tiny", "train_mode": "lora", "lora_rank": 4},
                     {"family": "vit", "size": "tiny"}],
        "distill": {"alpha": 0.5, "weights": {"kd": 1.0, "mhca": 1.0, "ot": 1.0, "relation": 1.0},
                    "mhca": {"dim": 32, "heads": 2},
                    "ot": {"dim": 32, "iters": 20, "lead_prior": 0.5}},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.001, "augment": {"printout": 0.5}},
        "evaluate": {"bootstrap": 30, "latency_repeats": 1},
        "quantize": {"formats": ["int8", "onnx-int8"], "calibration_records": 32},
    }
    path = root / "img.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.mark.slow
def test_vlm_and_image_students_run_end_to_end(tmp_path: Path, capsys) -> None:
    assert main(["run", str(image_recipe(tmp_path)), "--quiet"]) == 0
    run = tmp_path / "runs" / "img"
    results = json.loads((run / "results.json").read_text())
    # (no ablation here: its jobs are those of the signal students' ablations, tested there)
    assert set(results["models"]) == {
        "teacher", "baseline llava/tiny", "distill llava/tiny", "baseline vit/tiny",
        "distill vit/tiny"}

    # the VLM student differs from the teacher in tokens and width, and distilled with
    # every term of the objective (each logged, each non-zero)
    teacher = teachers.load(run / "teacher" / "best", train_mode="frozen").eval()
    student = AutoModel.from_pretrained(run / "distill" / "llava-tiny" / "best").eval()
    image = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        t_out, s_out = teacher(image=image), student(image=image)
    assert t_out.tokens.shape[1:] == (196, 64) and s_out.tokens.shape[1:] == (49, 128)
    assert (s_out.token_leads >= 0).any() and (t_out.token_leads >= 0).any()  # OT: both sides
    head, first = (run / "distill" / "llava-tiny" / "log.csv").read_text().splitlines()[:2]
    row = dict(zip(head.split(","), first.split(",")))
    for term in ("kd", "mhca", "ot", "relation"):
        assert float(row[f"train_{term}"]) > 0, (term, row)
    # LoRA training: the saved student has its adapters merged, a plain model
    assert student.config.lora is None and student.config.lora_merged["r"] == 4
    assert not any("lora_" in n for n, _ in student.named_parameters())

    # the stress test: every model that reads printouts, every variation, paired to clean
    stress = results["stress"]
    assert list(stress["variations"]) == list(STRESS_SET)
    assert set(stress["models"]) == set(results["models"])  # all of them read printouts
    for per in stress["models"].values():
        clean = per["clean"]["macro_auc"]
        assert clean["low"] <= clean["value"] <= clean["high"]
        for name in STRESS_SET:
            if name != "clean":
                d = per[name]["vs_clean"]
                assert d["low"] <= d["value"] <= d["high"]
    # clean is the evaluation's own score: the same printouts, the same resamples
    for name, per in stress["models"].items():
        assert per["clean"]["macro_auc"]["value"] == pytest.approx(
            results["models"][name]["macro_auc"]["value"], abs=1e-9)
    report = (run / "report.md").read_text()
    assert "Printout robustness" in report and "figures/perturbations.png" in report
    with Image.open(run / "figures" / "perturbations.png") as img:
        assert img.size[0] > 300

    # bitsandbytes: the VLM student's language model only; the ViT's Linear layers
    quantized = json.loads((run / "quantized.json").read_text())
    assert {"distill llava/tiny int8", "distill vit/tiny int8"} <= set(quantized["models"])
    notes = quantized["models"]["distill llava/tiny int8"]["quantization"]["notes"]
    assert any("vision tower stays in full precision" in n for n in notes)
    plan = quantized["models"]["distill llava/tiny int8"]["quantization"]["quantized"]
    assert plan and all(".language_model." in name for name in plan)
    part = quantized["models"]["distill vit/tiny int8"]["quantization"]
    assert 3.0 < part["ratio_part"] < 4.0  # int8 codes + one fp32 scale per row
    # onnxruntime static int8 for the image student; a VLM student is refused, saying why
    assert "distill vit/tiny onnx-int8" in quantized["models"]
    contract = read_contract(run / "quantized" / "distill-vit-tiny-onnx-int8" / "model.onnx")
    assert contract["input"]["name"] == "image" and contract["input"]["dtype"] == "uint8"
    assert "bitsandbytes" in quantized["skipped"]["distill llava/tiny onnx-int8"]

    # export: printout samples, verified in a fresh process; the card's snippet scores a
    # real WFDB record printed as in training
    folder = run / "export" / "distill_llava-tiny"
    with safe_open(str(folder / "samples.safetensors"), framework="pt") as f:
        assert f.get_tensor("image").dtype == torch.uint8
        assert tuple(f.get_tensor("image").shape[1:]) == (3, 224, 224)
    card = (folder / "README.md").read_text()
    assert "prepare_printout" in card and "a printed 12-lead ECG" in card
    probs = run_card_snippet(card, str(folder), str(RECORD), tmp_path)
    assert set(probs) == set(results["classes"]) and all(0 <= p <= 1 for p in probs.values())
    onnx_folder = run / "export" / "distill_vit-tiny_onnx-int8"
    card = (onnx_folder / "README.md").read_text()
    probs = run_card_snippet(card, str(onnx_folder / "model.onnx"), str(RECORD), tmp_path)
    assert set(probs) == set(results["classes"])


def test_printout_augmentation_is_seeded_by_the_batch_and_leaves_signal_students() -> None:
    recipe = recipe_from_dict({"students": [{"family": "vit"}, {"family": "xresnet1d"}],
                               "train": {"augment": {"printout": 1.0}}})
    vit, xres = recipe.students
    images = torch.from_numpy(np.full((4, 3, 224, 224), 240, dtype=np.uint8))
    images[:, :, 100:104, :] = 0  # a trace
    batch = {"image": images, "index": torch.arange(4), "student:xresnet1d/tiny": torch.zeros(4, 12, 1000)}
    aug = student_train_inputs(recipe, vit)
    a, b = aug(batch)["image"], aug(batch)["image"]
    assert torch.equal(a, b) and not torch.equal(a, images)  # the same records: the same draw
    other = aug({**batch, "index": torch.arange(4, 8)})["image"]
    assert not torch.equal(other, a)
    assert torch.equal(student_inputs(vit)(batch)["image"], images)  # evaluation: clean
    assert student_train_inputs(recipe, xres)(batch).keys() == {"signal"}
    clean = recipe_from_dict({"students": [{"family": "vit"}]})
    assert torch.equal(student_train_inputs(clean, clean.students[0])(batch)["image"], images)


@pytest.mark.parametrize("family", ["vit", "convnext", "llava"])
def test_image_students_give_each_token_its_lead(family: str) -> None:
    model = students.create(family, "tiny", num_labels=3).eval()
    stride = model.token_stride
    want = patch_lead_map(RenderConfig(), stride)
    with torch.no_grad():
        out = model(image=torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert torch.equal(out.token_leads, torch.from_numpy(want).long())
    assert {"vit": 16, "convnext": 16, "llava": 32}[family] == stride


def test_image_student_input_errors_name_what_was_expected() -> None:
    model = students.create("convnext", "tiny", num_labels=3)
    with pytest.raises(ValueError, match=re.escape(
            "convnext expects image [B, 3, 224, 224] (uint8 0..255, a rendered printout), "
            "got [2, 3, 112, 112]")):
        model(image=torch.zeros(2, 3, 112, 112, dtype=torch.uint8))
    with pytest.raises(ValueError, match="got torch.int64"):
        model(image=torch.zeros(2, 3, 224, 224, dtype=torch.long))
    with pytest.raises(ValueError, match="patch_size 48 does not divide image_size 224"):
        students.create("vit", "tiny", num_labels=3, patch_size=48)
    with pytest.raises(ValueError, match="unknown render setting 'colour'"):
        students.create("vit", "tiny", num_labels=3, render={"colour": 1})


def test_recipe_refuses_lora_for_students_without_a_language_model() -> None:
    from distill.core.errors import RecipeError

    with pytest.raises(RecipeError, match=re.escape(
            "students.0.train_mode: lora trains adapters on a VLM student's language model; "
            "vit has none (use full)")):
        recipe_from_dict({"students": [{"family": "vit", "train_mode": "lora"}]})
    with pytest.raises(RecipeError, match="llava has no 'base' preset; its sizes: tiny, small"):
        recipe_from_dict({"students": [{"family": "llava", "size": "base"}]})
    assert StudentConfig().train_mode == "full"


def test_recipe_refuses_what_image_students_cannot_read() -> None:
    from distill.core.errors import RecipeError

    with pytest.raises(RecipeError, match=re.escape("students.0.view: vit reads the printout")):
        recipe_from_dict({"students": [{"family": "vit", "view": {"sampling_rate": 50}}]})
    with pytest.raises(RecipeError, match=re.escape(
            "train.augment: signal augmentation (noise, amplitude, shift, views) does not "
            "reach convnext")):
        recipe_from_dict({"students": [{"family": "convnext"}],
                          "train": {"augment": {"noise": 0.05}}})
    with pytest.raises(RecipeError, match="students.1.family: vit reads square printouts; "
                                          "data.image is 224x448"):
        recipe_from_dict({"students": [{"family": "xresnet1d"}, {"family": "vit"}],
                          "data": {"image": {"height": 224, "width": 448}}})


def test_printout_settings_reach_image_students_fingerprints_only() -> None:
    from distill.engine.jobs import printout_settings, train_settings

    plain = recipe_from_dict({"students": [{"family": "xresnet1d"}, {"family": "vit"}]})
    aug = recipe_from_dict({"students": [{"family": "xresnet1d"}, {"family": "vit"}],
                            "train": {"augment": {"printout": 0.3}},
                            "data": {"image": {"grid": False}}})
    assert train_settings(plain) == train_settings(aug)  # signal students: unchanged
    assert printout_settings(plain, plain.students[0]) == {} == printout_settings(
        aug, aug.students[0])
    a, b = printout_settings(plain, plain.students[1]), printout_settings(aug, aug.students[1])
    assert a["printout"]["grid"] is True and b["printout"]["grid"] is False
    assert "printout_augment" not in a and b["printout_augment"] == 0.3


def test_lora_student_saves_its_trained_adapters_merged(tmp_path: Path) -> None:
    model = students.create("llava", "tiny", num_labels=3, lora={"r": 4, "alpha": 8})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    image = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # move B away from zero: the adapters now change the output
        out = model(image=image, labels=torch.ones(2, 3))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        live, back = model(image=image), loaded(image=image)
    torch.testing.assert_close(back.logits, live.logits, rtol=1e-4, atol=1e-4)
    assert loaded.config.lora is None and model.config.lora is not None  # the live one trains on
    adapters = {n for n, _ in model.named_parameters() if "lora_B" in n}
    assert adapters and all(p.abs().sum() > 0 for n, p in model.named_parameters() if n in adapters)


def test_vlm_student_starts_from_an_image_text_to_text_checkpoint() -> None:
    folder = teachers.tiny_folder("vlm")  # a LLaVA written by save_pretrained, with its processor
    model = students.create("llava", "tiny", num_labels=3, backbone=str(folder)).eval()
    reference = AutoModel.from_pretrained(folder)  # LlavaModel: the same body
    ref = dict(reference.named_parameters())
    for name, p in model.vlm.named_parameters():
        torch.testing.assert_close(p, ref[name], rtol=0, atol=0)
    with torch.no_grad():
        out = model(image=torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    assert out.tokens.shape[1:] == (196, 64) and model.token_stride == 16
    assert model.config.pixel_mean == list(teachers.VLMTeacher(
        str(folder), num_labels=3).processor.image_processor.image_mean)
