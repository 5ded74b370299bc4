"""The wearable scenario (issue 20, deliverable 4b): a student view upsampled by the 25 ->
100 Hz translator (``students.N.view.translate``), and the wearable recipe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.core.errors import RecipeError
from distill.core.hashing import sha256_file
from distill.engine.factory import saved_student_view, student_key
from distill.engine.jobs import _spec_key, baseline_job, load_job_data, normalization
from distill.models.rvq import RVQTokenizer, RVQTokenizerConfig
from distill.models.translator import TranslatorModel
from distill.recipe import load_recipe
from distill.recipe.load import recipe_from_dict

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 10  # the synthetic records' length
SMALL_RVQ = {"stem_channels": 8, "hidden_size": 16, "codebook_dim": 8, "num_quantizers": 2,
             "codebook_size": 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizer(rate: int, seed: int) -> RVQTokenizer:
    torch.manual_seed(seed)
    tok = RVQTokenizer(RVQTokenizerConfig(sampling_rate=rate, input_samples=SECONDS * rate,
                                          patch_size=round(0.4 * rate), **SMALL_RVQ))
    tok.quantizer.quantize_dropout = False
    tok(torch.randn(4, 12, SECONDS * rate, generator=torch.Generator().manual_seed(seed)))
    return tok.eval()


def _recipe(tmp: Path, *overrides: str):
    return recipe_from_dict({
        "name": "wear", "output_dir": str(tmp / "runs" / "{name}"),
        "data": {"synthetic": {"records": 40, "seed": 0}, "task": "rhythm",
                 "cache_dir": str(tmp / "cache")},
        "students": [{"family": "xresnet1d", "size": "tiny", "view": {"leads": ["I"]}}],
        "train": {"epochs": 1, "batch_size": 8}}, list(overrides))


@pytest.fixture(scope="module")
def translator_folder(tmp_path_factory) -> Path:
    """A tiny translator saved with the scaling of the recipe's data."""
    tmp = tmp_path_factory.mktemp("translator")
    torch.manual_seed(0)
    model = TranslatorModel.from_tokenizers(_tokenizer(25, 0), _tokenizer(100, 1),
                                            hidden_size=32, num_layers=1, num_heads=2)
    model.config.normalization = normalization(load_job_data(_recipe(tmp), progress=False).data)
    model.save_pretrained(tmp / "best")
    return tmp / "best"


def test_a_translated_view_reads_25_hz_and_serves_the_translation(tmp_path: Path,
                                                                   translator_folder: Path
                                                                   ) -> None:
    recipe = _recipe(tmp_path, f"students.0.view.translate={translator_folder}",
                     "students.0.view.sampling_rate=25")  # the device's rate: allowed
    jd = load_job_data(recipe, progress=False)
    spec = recipe.students[0]
    view = jd.views[student_key(spec)]
    assert view.sampling_rate == 25 and view.upsample is not None
    item = jd.data.split("test", {"s": view})[0]
    assert item["s"].shape == (1, 100 * SECONDS)
    # the item is the translation of the record's lead I at 25 Hz
    plain = jd.data.split("test", {"s": type(view)(leads=("I",), sampling_rate=25)})[0]["s"]
    model = TranslatorModel.from_pretrained(translator_folder).eval()
    expected = model.translate(plain[None], torch.tensor([[0]]))[0]
    torch.testing.assert_close(item["s"], expected)
    # the student reads 100 Hz; its job trains on the translated view
    job = baseline_job(jd, spec)
    assert (job.model.config.sampling_rate, job.model.config.input_samples) == (100, 1000)
    batch = torch.utils.data.default_collate([job.train_set[i] for i in range(2)])
    loss, _ = job.loss_fn(job.model, batch)
    assert torch.isfinite(loss)
    # the saved student names its translator; eval and export rebuild the same input
    job.model.save_pretrained(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["translate"]["checkpoint"] == str(translator_folder)
    again = saved_student_view(saved)
    assert (again.leads, again.sampling_rate) == (("I",), 25) and again.upsample is not None
    torch.testing.assert_close(jd.data.split("test", {"s": again})[0]["s"], item["s"])
    assert saved_student_view({"leads": ["I"], "sampling_rate": 100}).upsample is None
    # the translator's weights are part of the student's fingerprint
    assert _spec_key(spec)["translator"] == {
        "model.safetensors": sha256_file(translator_folder / "model.safetensors")}
    assert "translate" not in _spec_key(_recipe(tmp_path).students[0])["view"]
    # an exported student bundles its translator and finds it wherever the folder goes
    from distill.core.errors import ECGDistillError
    from distill.hub.export import TRANSLATOR_DIR, bundle_translator
    export = tmp_path / "export"
    shutil.copytree(tmp_path / "student", export)
    config = bundle_translator(export, saved)
    assert config["translate"]["checkpoint"] == TRANSLATOR_DIR
    assert json.loads((export / "config.json").read_text())["translate"] == config["translate"]
    assert (export / TRANSLATOR_DIR / "model.safetensors").read_bytes() == \
        (translator_folder / "model.safetensors").read_bytes()
    moved = tmp_path / "elsewhere"
    export.rename(moved)
    bundled = saved_student_view(config, moved)
    torch.testing.assert_close(jd.data.split("test", {"s": bundled})[0]["s"], item["s"])
    with pytest.raises(ECGDistillError, match="that folder is gone; restore it to export"):
        bundle_translator(tmp_path / "student",
                          {**saved, "translate": {**saved["translate"],
                                                  "checkpoint": str(tmp_path / "gone")}})


def test_the_upsampler_translates_each_input_once(translator_folder: Path) -> None:
    import pickle

    from distill.models.translator import Upsampler

    up = Upsampler(translator_folder, memo_bytes=2 * 4000)  # two outputs of 1000 floats
    calls = []
    x = np.random.default_rng(0).normal(size=(3, 1, 250)).astype(np.float32)
    first = up(x[0], (0,))
    real = up._model.translate
    up._model.translate = lambda *a: calls.append(1) or real(*a)
    np.testing.assert_array_equal(up(x[0], (0,)), first)  # remembered
    assert calls == []
    up(x[0], (1,))  # another lead: translated
    up(x[1], (0,))  # a third output: the oldest is dropped
    assert len(calls) == 2 and len(up._memo) == 2
    up(x[0], (0,))
    assert len(calls) == 3
    clone = pickle.loads(pickle.dumps(up))  # into a data-loader worker: empty, unloaded
    assert clone._model is None and not clone._memo
    np.testing.assert_allclose(clone(x[0], (0,)), first)


def test_student_keys_keep_their_lora_settings() -> None:
    """The key of a student without a translator is what it was before translated views:
    a LoRA student's default rank and alpha stay in it (runs resume)."""
    from distill.recipe import StudentConfig

    key = _spec_key(StudentConfig(family="llava", size="tiny", train_mode="lora"))
    assert (key["lora_rank"], key["lora_alpha"]) == (8, 16) and key["train_mode"] == "lora"
    assert "translate" not in key["view"]


def test_translated_views_are_checked(tmp_path: Path, translator_folder: Path) -> None:
    with pytest.raises(RecipeError, match=r"^students\.0\.view\.translate: cannot read a "
                                          r"translator in .*missing"):
        load_job_data(_recipe(tmp_path, f"students.0.view.translate={tmp_path / 'missing'}"),
                      progress=False)
    with pytest.raises(RecipeError, match=r"^students\.0\.view\.sampling_rate: 50 Hz, but the "
                                          r"translator .* reads 25 Hz and writes 100 Hz"):
        load_job_data(_recipe(tmp_path, f"students.0.view.translate={translator_folder}",
                              "students.0.view.sampling_rate=50"), progress=False)
    with pytest.raises(RecipeError, match=r"teacher\.view\.translate: only a student's view"):
        _recipe(tmp_path, f"teacher.view.translate={translator_folder}")
    # a translator trained on data scaled otherwise is refused by name
    model = TranslatorModel.from_pretrained(translator_folder)
    model.config.normalization = {**model.config.normalization,
                                  "std": [1.0] * 12}
    model.save_pretrained(tmp_path / "other")
    recipe = _recipe(tmp_path, f"students.0.view.translate={tmp_path / 'other'}")
    jd = load_job_data(recipe, progress=False)
    with pytest.raises(RecipeError, match=r"students\.0\.view\.translate: the translator .* "
                                          r"was trained on data scaled otherwise"):
        baseline_job(jd, recipe.students[0])


def test_the_wearable_recipe_and_its_translated_run_validate() -> None:
    recipe = load_recipe(ROOT / "recipes" / "wearable-25hz.yaml")
    assert recipe.teacher.kind == "foundation" and recipe.data.task == "rhythm"
    (student,) = recipe.students
    assert (student.view.leads, student.view.sampling_rate) == (["I"], 25)
    assert recipe.distill.weights["codes"] > 0 and recipe.ablations.runs == ["no_codes"]
    other = load_recipe(ROOT / "recipes" / "wearable-25hz.yaml", [
        "name=wearable-25hz-translated",
        "students.0.view.translate=runs/translator/translator/best",
        "teacher.name_or_path=runs/wearable-25hz/teacher/best", "teacher.train_mode=frozen",
        "ablations.runs=[]"])
    assert other.students[0].view.translate == "runs/translator/translator/best"
    assert np.isclose(other.distill.alpha, recipe.distill.alpha)
