"""Package a teacher trained by a ``recipes/teacher-zoo/`` recipe for shipping.

``ecg-distill zoo pack RECIPE`` takes the recipe's trained teacher (``<run>/teacher/best``),
stores its backbone in fp16, scores it on its own corpus's validation and test folds and
on a fixed check set of synthetic records, and writes ``teachers/zoo/<name>/`` with a model
card (``README.md``), ``card.json`` and the SHA-256 of every file (see :mod:`teachers.zoo`).
The folder is written next to its target and renamed into place, so a failed pack never
leaves half a teacher; an existing one is replaced only with ``force``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import teachers
from distill.core.errors import RecipeError
from distill.core.io import atomic_dir
from distill.core.layout import ModelId, RunLayout
from distill.data.dataset import load_ptbxl
from distill.data.render import RenderConfig, render_batch
from distill.data.synth import patient_id_range
from distill.data.tools import write_synthetic
from distill.engine.accel import machine_description
from distill.engine.factory import teacher_class
from distill.engine.jobs import load_job_data, teacher_inputs
from distill.metrics.classification import macro_auc
from distill.metrics.scoring import predict
from distill.recipe import Recipe
from teachers import zoo

# The check set: records no zoo corpus or quickstart set contains (their own seed and
# patient ids), scored by the packed teacher and stated on its card; a test re-scores it.
CHECK_SET = {"records": 64, "seed": 2, "first_patient_id": 200001}
CHECK_TOLERANCE = 0.01


def check_set_data(info: dict[str, Any], classes: list[str], cache_dir: Path | None = None):
    """The card's check set: (images uint8 [N, 3, H, W], labels [N, C]), generated,
    loaded and rendered through the same code as a recipe's synthetic data."""
    spec = info["check_set"]
    render = info["render"]
    with tempfile.TemporaryDirectory(prefix="ecg-distill-check-") as tmp:
        folder = Path(tmp) / "data"
        write_synthetic(folder, records=spec["records"], seed=spec["seed"],
                        first_patient_id=spec["first_patient_id"], sampling_rates=(100,),
                        progress=False)
        data = load_ptbxl(folder, task=info["corpus"]["task"], sampling_rate=100,
                          classes=classes, progress=False, cache_dir=cache_dir or Path(tmp))
        config = RenderConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in render.items()})
        images = render_batch(np.asarray(data.signals), data.sampling_rate, config)
        return images, np.asarray(data.labels)


@torch.no_grad()
def score_check_set(teacher: torch.nn.Module, info: dict[str, Any]) -> float:
    """Macro AUC of ``teacher`` on the card's check set."""
    teacher.eval()
    classes = list(teacher.id2label.values())
    images, labels = check_set_data(info, classes)
    probs = [torch.sigmoid(teacher(image=torch.from_numpy(images[s:s + 32])).logits.float())
             for s in range(0, len(images), 32)]
    return macro_auc(labels, torch.cat(probs).numpy())


def _fold_auc(teacher, jd, split: str, progress: bool) -> float:
    dataset = jd.data.split(split, {"teacher": jd.views["teacher"]}, extras=jd.image_extras())
    index, probs = predict(teacher, dataset, teacher_inputs(jd.recipe), batch_size=64,
                           progress=progress, desc=f"scoring the {split} fold")
    return macro_auc(np.asarray(jd.data.labels)[index], probs)  # index: record positions


def _card_text(name: str, info: dict[str, Any]) -> str:
    c, m = info["corpus"], info["model"]
    runs = "\n".join(f"| {r['machine']} | {r['train_seconds'] / 60:.0f} min | "
                     f"{r['data_seconds'] / 60:.1f} min | {r['records_per_s']:.1f} |"
                     for r in info["runs"])
    weights = info["files"]["backbone/model.safetensors"]
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: image-text-to-text
tags: [ecg, electrocardiogram, llava, knowledge-distillation, ecg-distill]
---

# {name}

A teacher shipped with ecg-distill: an image-text-to-text VLM that reads a rendered
{info['render']['height']} x {info['render']['width']} 12-lead printout and a prompt, with a
multi-label head for PTB-XL's {c['task']} classes ({', '.join(info['classes'])}). Trained
from scratch on synthetic records only, it stands in for a large pretrained ECG VLM (such
as PULSE-7B): a teacher far larger than the students, pretrained on far more records than
a user has.

- Parameters: {m['parameters']:,} ({m['description']})
- Weights: `backbone/model.safetensors`, fp16, SHA-256 `{weights}`
  (every file's SHA-256 is in `card.json` and checked whenever the teacher is loaded)

## Training corpus

Synthetic PTB-XL-layout records from ecg-distill's generator, version
{c['generator_version']}: {c['records']:,} records, seed {c['seed']}, patient ids
{c['patient_ids'][0]}-{c['patient_ids'][1]} (the quickstart's set: seed 0, ids 1-2,609), folds
{c['folds']['train']} for training, {c['folds']['val']} for validation, {c['folds']['test']}
held out. A different generator version warns at load time.

## Results

| split | records | macro AUC |
|---|---|---|
| validation (fold {', '.join(map(str, c['folds']['val']))}) | {info['results']['val']['records']:,} | {info['results']['val']['macro_auc']:.4f} |
| test (fold {', '.join(map(str, c['folds']['test']))}) | {info['results']['test']['records']:,} | {info['results']['test']['macro_auc']:.4f} |
| check set ({info['check_set']['records']} records, seed {info['check_set']['seed']}) | {info['check_set']['records']} | {info['check_set']['macro_auc']:.4f} |

Scores are of the shipped fp16 weights. The check set is regenerated and re-scored by the
test suite (`tests/test_zoo.py`), within {CHECK_TOLERANCE}.

## Reproduce

```
{info['command']}
```

| machine | training | data (generate, decode, render) | records/s |
|---|---|---|---|
{runs}

## Use

```yaml
teacher:
  kind: vlm
  name_or_path: {name}
  train_mode: head        # or lora / full / frozen
```
"""


def pack(recipe: Recipe, recipe_path: str | os.PathLike, *, name: str | None = None,
         out: str | os.PathLike | None = None, force: bool = False,
         progress: bool = True) -> dict[str, Any]:
    """Write the recipe's trained teacher to ``teachers/zoo/<name>`` (see module docstring).

    Returns:
        The card (``card.json``'s content).

    Raises:
        RecipeError: no complete teacher run, a non-image teacher, or an existing target
            without ``force``.
    """
    if not teacher_class(recipe).reads_images():
        raise RecipeError(f"teacher.kind: zoo pack ships image teachers only (a "
                          f"{recipe.teacher.kind} teacher reads signals)")
    if recipe.data.path is not None:
        raise RecipeError("data.path: a zoo teacher is trained on the synthetic corpus "
                          "(data.path: null), whose generator its card records")
    name = name or recipe.name
    target = Path(out) if out is not None else zoo.ZOO_DIR / name
    if target.exists() and not force:
        raise RecipeError(f"{target} exists; pass --force to replace it")
    run_dir = recipe.run_dir
    layout = RunLayout(run_dir)
    job_dir = layout.job_dir(ModelId.teacher())
    best = layout.teacher_best
    metrics_path = job_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if not metrics.get("complete") or not (best / "teacher.json").is_file():
        raise RecipeError(f"no complete teacher run in {job_dir}; run "
                          f"`ecg-distill teacher {recipe_path}` first (--resume continues it)")

    with atomic_dir(target) as tmp:
        trained = teachers.load(best, train_mode="full")
        trained.backbone.to(torch.float16)
        trained.save_pretrained(tmp)
        meta = json.loads((tmp / "teacher.json").read_text())
        meta.update(source=name, train_mode="frozen")
        (tmp / "teacher.json").write_text(json.dumps(meta, indent=2))
        packed = teachers.load(tmp, train_mode="frozen").eval()  # as a user loads it

        jd = load_job_data(recipe, progress=progress)
        results = {}
        for split in ("val", "test"):
            auc = _fold_auc(packed, jd, split, progress)
            results[split] = {"records": int(len(jd.data.splits[split])), "macro_auc": auc}
            print(f"{name}: {split} macro AUC {auc:.4f} ({results[split]['records']} records)")
        syn = recipe.data.synthetic
        marker = layout.marker("data")
        data_seconds = json.loads(marker.read_text()).get("seconds", 0.0) \
            if marker.is_file() else 0.0
        history = metrics.get("history", [])
        train_seconds = float(sum(r.get("train_seconds", 0.0) for r in history))
        seen = sum(r.get("train_records_per_s", 0.0) * r.get("train_seconds", 0.0)
                   for r in history)
        vision = packed.hf_model.config.vision_config
        info: dict[str, Any] = {
            "name": name,
            "classes": list(packed.id2label.values()),
            "model": {
                "parameters": int(sum(p.numel() for p in packed.parameters())),
                "description": f"{type(vision).__name__.replace('Config', '')} vision tower, "
                               f"{len(packed.token_leads)} visual tokens at a "
                               f"{packed.patch_size}-px stride; Llama of width "
                               f"{packed.hf_model.config.text_config.hidden_size}",
                "dtype": "float16",
            },
            "corpus": {"generator_version": syn.generator, "records": syn.records,
                       "seed": syn.seed, "patient_ids": list(patient_id_range(
                           syn.records, syn.first_patient_id)),
                       "task": recipe.data.task, "sampling_rate": recipe.data.sampling_rate,
                       "folds": {k: list(getattr(recipe.data.folds, k))
                                 for k in ("train", "val", "test")}},
            "recipe": str(recipe_path),
            "command": (f"ecg-distill teacher {recipe_path}\n"
                        f"ecg-distill zoo pack {recipe_path}"),
            "training": {"epochs": metrics.get("epochs_run"), "steps": metrics.get("steps"),
                         "best_epoch": metrics.get("best_epoch")},
            "runs": [{"machine": metrics.get("machine") or machine_description(),
                      "train_seconds": round(train_seconds, 1),
                      "data_seconds": round(float(data_seconds), 1),
                      "records_per_s": round(seen / max(train_seconds, 1e-9), 2)}],
            "results": results,
            "render": {**packed.settings["render"], "height": packed.tower_size,
                       "width": packed.tower_size},
            "check_set": dict(CHECK_SET),
        }
        info["check_set"]["macro_auc"] = score_check_set(packed, info)
        print(f"{name}: check set macro AUC {info['check_set']['macro_auc']:.4f}")
        info["files"] = zoo.file_hashes(tmp)
        info = json.loads(json.dumps(info))  # as card.json reads back (tuples as lists)
        (tmp / zoo.CARD_FILE).write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "README.md").write_text(_card_text(name, info))
        zoo.verify(tmp)
    print(f"wrote {target} ({sum(f.stat().st_size for f in target.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    return info
