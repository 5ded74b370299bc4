"""Export: a run's students (and their quantized variants) as hub-ready folders.

``ecg-distill export RUN`` writes, per model, ``RUN/export/<model>/`` (e.g.
``distill_leadformer-tiny``, ``distill_leadformer-tiny_nf4``)::

    config.json           the student's config: id2label, leads, sampling_rate,
                          input_samples, normalization (+ quantization_config if quantized)
    model.safetensors     the weights, as saved (never a pickle); an ONNX variant ships
                          model.onnx instead (the input contract in its metadata)
    modeling_ecg_student.py  (PyTorch folders) the student's code, self-contained, named in
                          config.json's auto_map: AutoModel.from_pretrained(folder,
                          trust_remote_code=True) loads it without ecg-distill
    quantization.json     (quantized variants) the quantize stage's summary
    README.md             the model card: hub metadata (license, tags, datasets, base_model =
                          the teacher, model-index with the test macro AUC and its interval),
                          results and a usage snippet that is run by the tests
    recipe.yaml           the run's resolved recipe
    results.json          this model's entry of the run's results
    samples.safetensors   a few test records' inputs and the run's predictions for them
    translator/           (a student that reads a translator's output, e.g. 25 Hz lead I
                          upsampled to 100 Hz) that translator, named in config.json's
                          ``translate.checkpoint`` relative to the folder
    checksums.sha256      SHA-256 of every other file (``sha256sum -c`` reads it)

A folder is written in a temporary folder next to its destination, verified in a fresh
process (:func:`distill.hub.publish.verify_folders`) and only then renamed into place, so a
failed or killed export leaves no half-written folder and replaces nothing; an existing
export is replaced only with ``force``.

The reproduced predictions are *stored* rather than recomputed from the run at
verification time: the folder then proves itself wherever it goes (after publishing, on
an air-gapped site) without the run or its data set; the inputs are taken from the run's
data through the same dataset code that made the stored predictions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from distill.compress.onnx import ONNX_FILE, is_onnx_folder
from distill.core.errors import ECGDistillError
from distill.core.io import atomic_dir, atomic_write_text, require_safetensors
from distill.core.layout import ModelId, RunLayout
from distill.core.progress import progress_bar
from distill.data.load import load_data
from distill.engine.factory import saved_student_view
from distill.hub.model_card import model_card
from distill.hub.portable import write_portable
from distill.hub.publish import CONFIG_KEYS, SAMPLES, verify_folders, write_manifest
from distill.metrics.results import load_results
from distill.recipe import read_yaml, recipe_from_dict
from students.preprocess import prepare_printout_signal, scaler_from_config

TRAINING_ONLY = ("objective.safetensors",)  # the distillation losses' projections
SHIPPED = ("config.json", "quantization.json")  # besides the weights
TRANSLATOR_DIR = "translator"  # a translated student's translator, inside its folder
N_SAMPLES = 4
# |probability| tolerance when reproducing: LLM.int8 picks its fp16 outlier columns per
# batch, so a quantized model's outputs move a little with the batch a record is in
ATOL = {"fp32": 1e-4, "quantized": 1e-2}


def folder_name(name: str) -> str:
    """A model's folder under ``export/``: "distill leadformer/tiny nf4" ->
    "distill_leadformer-tiny_nf4"."""
    return ModelId.parse(name).folder_name


def predictions_file(run_dir: Path, name: str, entry: dict[str, Any]) -> Path:
    """Where the evaluation (or the quantize stage) kept a model's predictions: the entry's
    ``predictions`` when that file exists, else where :class:`RunLayout` puts them in
    ``run_dir`` (a moved run)."""
    if entry.get("predictions") and Path(entry["predictions"]).is_file():
        return Path(entry["predictions"])
    return RunLayout(run_dir).predictions(ModelId.parse(name))


def _run_relative(value: Any, run_dir: Path) -> Any:
    """``value`` with every path inside the run folder made relative to it (a published
    results.json names no directory of the machine that made it)."""
    if isinstance(value, dict):
        return {k: _run_relative(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_run_relative(v, run_dir) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        for root in {run_dir.resolve(), run_dir.absolute()}:
            if Path(value).is_relative_to(root):
                return Path(value).relative_to(root).as_posix()
    return value


def select_models(results: dict[str, Any], names: Sequence[str] | None = None,
                  formats: Sequence[str] | None = None) -> list[str]:
    """The models to export: ``names`` (model names or their folder names), or every
    distilled student and quantized variant; with ``formats``, only those in these formats
    ("fp32" for the students themselves, or a variant's format: int8, nf4, onnx,
    onnx-int8 ...)."""
    models = results["models"]
    if names and formats:
        raise ECGDistillError("--model and --format together: name the models, or the "
                              "formats of the distilled models to export, not both")
    if not names:
        chosen = [n for n in models if ModelId.parse(n).fp32.kind == "distill"]
        if formats:
            chosen = [n for n in chosen if (ModelId.parse(n).variant or "fp32") in formats]
            if not chosen:
                made = sorted({ModelId.parse(n).variant or "fp32" for n in models})
                raise ECGDistillError(
                    f"--format {' '.join(formats)}: no distilled model of the run in that "
                    f"format (it has {', '.join(made)}); variants are made by the quantize "
                    f"stage: add the format to quantize.formats and run it, e.g. `ecg-distill "
                    f"run RECIPE 'quantize.formats=[{', '.join(f for f in formats if f != 'fp32')}]'`")
            return chosen
        if not chosen:
            raise ECGDistillError(f"no distilled or quantized model in the results (have "
                                  f"{', '.join(models)}); name one with --model")
        return chosen
    by_folder = {folder_name(n): n for n in models}
    out = []
    for name in names:
        model = name if name in models else by_folder.get(name)
        if model is None:
            raise ECGDistillError(f"--model {name!r}: not in the run's results; known: "
                                  f"{', '.join(models)}")
        if ModelId.parse(model).kind == "teacher":
            raise ECGDistillError(f"--model {name!r}: the teacher is not exported (export "
                                  f"publishes the compact students and their quantized variants)")
        if model not in out:
            out.append(model)
    return out


def model_source(run_dir: Path, name: str, entry: dict[str, Any]) -> Path:
    """The saved folder of a model: the path results.json names, looked up under
    ``run_dir`` first (so a copied or moved run exports its own models), then as it is."""
    stored = Path(entry.get("folder") or "")
    parts = stored.parts[1:] if stored.is_absolute() else stored.parts
    for candidate in [*(run_dir.joinpath(*parts[k:]) for k in range(len(parts))), stored]:
        if parts and (candidate / "config.json").is_file():
            return candidate
    raise ECGDistillError(f"model {name!r}: its folder {stored} is missing (looked in "
                          f"{run_dir} too)")


# ---------------------------------------------------------------- the folder


def export_run(run_dir: str | os.PathLike, *, models: Sequence[str] | None = None,
               out: str | os.PathLike | None = None, force: bool = False,
               samples: int = N_SAMPLES, progress: bool = True, data: Any = None,
               recipe: Any = None, formats: Sequence[str] | None = None) -> list[Path]:
    """Export models of a finished run as verified, hub-ready folders.

    Args:
        run_dir: the run folder (``results.json``, ``recipe.yaml``, the students' folders).
        models: model names of ``results.json`` (or folder names); default every
            distilled student and every quantized variant. The teacher is refused.
        out: the folder the exports go in (default ``run_dir/export``), one sub-folder
            per model named by :func:`folder_name`.
        force: replace existing export folders (else refused before any work).
        samples: test records whose inputs and predictions are stored for verification.
        progress: progress bars.
        data: the run's data set, already loaded (the run's export stage passes it);
            default: loaded from the run's recipe.
        recipe: the run's recipe (the export stage passes it); default: the run folder's
            ``recipe.yaml``.
        formats: export only the models in these formats (see :func:`select_models`).

    Returns:
        The exported folders.

    Raises:
        ECGDistillError: no results, an unknown model or the teacher, an existing export
        without ``force``, a pickle-only model folder, a config without the fields a user
        needs, or a folder that fails verification.
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    if samples < 1:
        raise ECGDistillError(f"--samples {samples}: at least one test record is stored, to "
                              f"check the exported model reproduces the run's predictions")
    results = load_results(run_dir)
    names = select_models(results, models, formats)
    targets = {name: layout.export_folder(ModelId.parse(name), out) for name in names}
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not force:
        raise ECGDistillError(f"{existing[0]} exists; pass --force to replace it"
                              + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""))
    if not layout.recipe_file.is_file():
        raise ECGDistillError(f"{run_dir}: no recipe.yaml; not a run folder")
    if recipe is None:
        recipe = recipe_from_dict(read_yaml(layout.recipe_file))
    sources = {name: model_source(run_dir, name, results["models"][name]) for name in names}
    for src in sources.values():
        if not is_onnx_folder(src):
            require_safetensors(src)
    if data is None:
        data = load_data(recipe.data, progress=progress)
    # every folder is written and verified before any is renamed into place
    with contextlib.ExitStack() as stack:
        tmps = {name: stack.enter_context(atomic_dir(targets[name])) for name in names}
        for name in progress_bar(names, enabled=progress, desc="exporting", unit="model"):
            write_folder(tmps[name], name=name, results=results, source=sources[name],
                         run_dir=run_dir, recipe=recipe, data=data, samples=samples)
        if progress:
            print(f"verifying {len(tmps)} folder(s) in a fresh process")
        verify_folders(list(tmps.values()))  # one process start-up for all of them
    return [targets[name] for name in names]


def write_folder(folder: Path, *, name: str, results: dict[str, Any], source: Path,
                 run_dir: Path, recipe, data, samples: int = N_SAMPLES) -> None:
    """Write every file of one export folder into ``folder`` (see the module docstring)."""
    entry = results["models"][name]
    onnx_model = is_onnx_folder(source)
    weights = [source / ONNX_FILE] if onnx_model else require_safetensors(source)
    for f in weights:
        if f.name not in TRAINING_ONLY:
            shutil.copyfile(f, folder / f.name)
    for extra in (*SHIPPED, *(p.name for p in source.glob("*.safetensors.index.json"))):
        if (source / extra).is_file():
            shutil.copyfile(source / extra, folder / extra)
    config = json.loads((folder / "config.json").read_text())
    missing = [k for k in CONFIG_KEYS if not config.get(k)]
    if missing:
        raise ECGDistillError(f"{source / 'config.json'}: no {', '.join(missing)}; a published "
                              f"student must say what it reads and how inputs are scaled")
    if config.get("translate"):  # it reads a translator's output: the translator ships too
        config = bundle_translator(folder, config)
    if not onnx_model:  # the model code ships too: loads with torch and transformers alone
        config = write_portable(folder, config)
    shutil.copyfile(RunLayout(run_dir).recipe_file, folder / "recipe.yaml")
    summary = {"model": name, **_run_relative(entry, run_dir),
               **{k: results.get(k) for k in ("classes", "task", "recipe", "test_records",
                                               "bootstrap")}}
    atomic_write_text(folder / "results.json", json.dumps(summary, indent=1))
    quantized = bool(config.get("quantization_config")) or \
        entry.get("format") in ("onnx-int8", "onnx-int4", "onnx-int8-qat")
    _write_samples(folder / SAMPLES, sample_records(data, config, run_dir, name, entry, samples,
                                                    folder=folder),
                   atol=ATOL["quantized" if quantized else "fp32"])
    model_card(name, entry, results, recipe, config).save(folder / "README.md")
    write_manifest(folder)


def bundle_translator(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Copy the translator a student reads (``config.translate.checkpoint``) into
    ``folder/translator`` and point the config there (relative, so the folder moves as a
    whole); the updated config, also written to ``folder/config.json``."""
    translate = dict(config["translate"])
    source = Path(translate["checkpoint"])
    if not (source / "config.json").is_file():
        raise ECGDistillError(f"{folder.name}: this student reads the translator {source}'s "
                              f"output, and that folder is gone; restore it to export the "
                              f"student")
    shutil.copytree(source, folder / TRANSLATOR_DIR,
                    ignore=shutil.ignore_patterns(*TRAINING_ONLY))
    config = {**config, "translate": {**translate, "checkpoint": TRANSLATOR_DIR}}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def sample_records(data, config: dict[str, Any], run_dir: Path, name: str,
                   entry: dict[str, Any], n: int, folder: Path | None = None
                   ) -> dict[str, np.ndarray]:
    """The first ``n`` test records of the run: the model's inputs, exactly as the
    evaluation fed them (the model's view of the run's data, scaled with the statistics
    its config stores), and the run's stored probabilities for them.

    Returns:
        {"signal": float32 [n, L, T], "probabilities": float32 [n, C], "ecg_id": int64 [n]};
        for an image student ``"image"``: uint8 [n, 3, S, S], the records printed as the data
        stage printed them (all 12 leads at the data's rate: an image student has no view of
        its own), the same pixels evaluation read.
    """
    path = predictions_file(run_dir, name, entry)
    if not path.is_file():
        raise ECGDistillError(f"model {name!r}: no stored predictions at {path}; evaluate the "
                              f"run first")
    with np.load(path) as preds:
        index, probs = preds["test_index"], preds["test"]
    split_rows = {int(k): i for i, k in enumerate(data.splits.get("test", []))}
    if len(split_rows) != len(index) or any(int(k) not in split_rows for k in index):
        raise ECGDistillError(f"{path}: its test records are not the test fold of the run's "
                              f"data as it loads now (the data changed since the run?)")
    if probs.shape[1] != len(config["id2label"]):
        raise ECGDistillError(f"{path}: {probs.shape[1]} classes, the model has "
                              f"{len(config['id2label'])}")
    rows = range(min(n, len(index)))
    if config.get("image_size"):  # an image student: the records printed as in training
        records = [int(index[r]) for r in rows]
        images = [prepare_printout_signal(data.signals[k], data.sampling_rate, config)
                  for k in records]
        return {"image": np.stack(images).astype(np.uint8),
                "probabilities": np.asarray(probs[list(rows)], dtype=np.float32),
                "ecg_id": np.asarray([int(data.ecg_ids[k]) for k in records], dtype=np.int64)}
    data = copy.copy(data)  # the caller's data set keeps its own scaler
    data.scaler = scaler_from_config(config)  # what the model was trained with
    view = saved_student_view(config, folder)  # a translated student: its translator's output
    split = data.split("test", {"signal": view})
    items = [split[split_rows[int(index[r])]] for r in rows]
    return {"signal": np.stack([it["signal"].numpy() for it in items]).astype(np.float32),
            "probabilities": np.asarray(probs[list(rows)], dtype=np.float32),
            "ecg_id": np.asarray([it["ecg_id"] for it in items], dtype=np.int64)}


def _write_samples(path: Path, arrays: dict[str, np.ndarray], atol: float) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
              metadata={"content": "test-fold inputs (scaled, as fed to the model) and the "
                                   "run's stored sigmoid probabilities for them",
                        "atol": f"{atol:g}"})
