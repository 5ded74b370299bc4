"""Recipe -> training jobs: the teacher's fine-tuning, label-only baselines, distillation.

Each builder returns a :class:`distill.engine.train.TrainJob` for
:func:`distill.engine.train.fit`. The
data set is loaded once (:func:`load_job_data`) and every job reads its own views of it:
the teacher the cached rendered images (or its signal view), each student its view (leads,
rate), and distillation both, of the same record at the same index.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn

import teachers
from distill.core.contract import ECGModelOutput
from distill.core.errors import RecipeError
from distill.core.hashing import sha256_file, stable_hash
from distill.core.layout import ModelId, RunLayout
from distill.core.schema import to_dict
from distill.data.augment import SignalAugment
from distill.data.perturb import ImageAugment
from distill.data.cache import ArrayCache
from distill.data.load import cache_root, load_data, render_config
from distill.data.dataset import ECGSplit
from distill.data.render import cached_images
from distill.data.transfer import (Flagged, MixedSet, labeled_training_rows, load_transfer,
                                   unlabeled_training_rows)
from distill.engine.accel import process_state
from distill.engine.factory import (build_objective, build_student, build_teacher, consumer_views,
                                    reads_images, saved_teacher_folder, student_inputs,
                                    student_key, student_reads_images, teacher_class)
from distill.engine.teacher_cache import (CODE_TOP, DrawnOutputs, TeacherOutputs, TokenFormat,
                                          cache_key, decode_tokens, expand_codes,
                                          teacher_outputs, weights_hash)
from distill.engine.train import TrainJob
from distill.losses import loss_family
from distill.recipe import AblationConfig, Recipe, StudentConfig
from teachers import zoo


@dataclass
class JobData:
    """The loaded data set and what every job reads of it."""

    recipe: Recipe
    data: Any  # ECGData
    views: dict[str, Any]  # consumer name -> SignalView
    images: np.ndarray | None  # uint8 [N, 3, H, W] memmap when a teacher or student reads them
    # data.label_fraction: the training records whose labels the students see, and the rest
    labeled_rows: np.ndarray | None = None  # None: every training record
    unlabeled_rows: np.ndarray | None = None
    transfer: Any = None  # ECGData of the extra transfer records (distill.transfer), or None
    transfer_images: np.ndarray | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.data.classes)

    @property
    def mixed(self) -> bool:
        """Whether students train on a labeled subset and/or with transfer records (else
        on the whole training split, as 0.1 did)."""
        return self.labeled_rows is not None or self.transfer is not None

    @property
    def teacher_class(self) -> type[teachers.TeacherAdapter]:
        return teacher_class(self.recipe)

    def image_extras(self) -> dict[str, Any] | None:
        """What a split must carry besides the signal views for every model to read it:
        the rendered printouts, when an image teacher or an image student reads them."""
        return {"image": self.images} if self.images is not None else None


def teacher_images(recipe: Recipe, data: Any, progress: bool = True) -> np.ndarray | None:
    """The rendered printout of every record (cached), when the recipe's teacher or one of
    its students reads images."""
    if not reads_images(recipe):
        return None
    return cached_images(data.signals, data.sampling_rate, render_config(recipe.data),
                         ArrayCache(cache_root(recipe.data)), data.fingerprint, progress=progress)


def load_job_data(recipe: Recipe, progress: bool = True, data: Any = None) -> JobData:
    """Load the recipe's data (cached; or use ``data``, already loaded) and, when an image
    teacher or an image student reads them, the rendered printouts (by the main process
    first)."""
    data = data if data is not None else load_data(recipe.data, progress=progress)
    with process_state().main_process_first():
        images = teacher_images(recipe, data, progress=progress)
    jd = JobData(recipe=recipe, data=data, views=consumer_views(recipe), images=images)
    fraction = recipe.data.label_fraction
    if fraction < 1.0:
        jd.labeled_rows = labeled_training_rows(data, fraction, recipe.seed)
        jd.unlabeled_rows = unlabeled_training_rows(data, fraction, recipe.seed)
    # generated, decoded and rendered once: by the main process first, the others then
    # read its caches (every process must see the same records)
    with process_state().main_process_first():
        jd.transfer = load_transfer(recipe.data, recipe.distill.transfer, data,
                                    progress=progress)
        if jd.transfer is not None:
            jd.transfer_images = teacher_images(recipe, jd.transfer, progress=progress)
    return jd


def augmentation(recipe: Recipe) -> SignalAugment:
    a = recipe.train.augment
    return SignalAugment(noise=a.noise, amplitude=a.amplitude, shift=a.shift)


def printout_augment(recipe: Recipe, spec: StudentConfig) -> ImageAugment | None:
    """The printout variations an image student trains on (``train.augment.printout``),
    or None (a signal student, or clean printouts)."""
    p = recipe.train.augment.printout
    return ImageAugment(p=p) if p > 0 and student_reads_images(spec) else None


def student_train_inputs(recipe: Recipe, spec: StudentConfig
                         ) -> Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]:
    """Batch -> a student's training inputs: its inputs, an image student's printouts
    perturbed (:func:`printout_augment`) with draws seeded by the batch's records, so a
    resumed run draws the same."""
    inputs = student_inputs(spec)
    aug = printout_augment(recipe, spec)
    if aug is None:
        return inputs

    def perturbed(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = inputs(batch)
        key = {"seed": recipe.seed, "index": batch["index"].tolist(),
               "draw": batch["draw"].tolist() if "draw" in batch else None}
        gen = torch.Generator().manual_seed(int(stable_hash(key)[:12], 16))
        out["image"] = aug(out["image"], gen)
        return out

    return perturbed


def augment_draws(recipe: Recipe) -> int:
    """K, the fixed augmented views per record the students draw from (and the teacher's
    outputs are cached on); 0 when augmentation is off or draws afresh every epoch."""
    return recipe.train.augment.views if augmentation(recipe).active else 0


def teacher_runs_live(recipe: Recipe) -> bool:
    """Whether distillation runs the teacher on every batch (augmentation drawn afresh each
    epoch) instead of reading its cached outputs."""
    return augmentation(recipe).active and not augment_draws(recipe)


def normalization(data: Any) -> dict[str, Any]:
    """The data set's scaler as a JSON-able dict (stored in every student's config, so a
    saved student carries the statistics its inputs must be scaled with)."""
    sc = data.scaler
    return {"kind": sc.kind, "mean": [float(v) for v in sc.mean], "std": [float(v) for v in sc.std],
            "units": "mV", "lead_order": "I II III aVR aVL aVF V1 V2 V3 V4 V5 V6"}


def _student(jd: JobData, spec: StudentConfig) -> nn.Module:
    student = build_student(jd.recipe, spec, jd.classes)
    student.config.normalization = normalization(jd.data)
    up = jd.views[student_key(spec)].upsample
    if up is not None:  # the translator reads signals scaled as its tokenizers were trained
        trained = getattr(up.config, "normalization", None) or {}
        mine = student.config.normalization
        if trained and (trained.get("kind") != mine["kind"] or not np.allclose(
                trained.get("mean"), mine["mean"], rtol=1e-4) or not np.allclose(
                trained.get("std"), mine["std"], rtol=1e-4)):
            at = f"students.{jd.recipe.students.index(spec)}.view.translate"
            raise RecipeError(f"{at}: the translator {up.checkpoint} was trained on data "
                              f"scaled otherwise ({trained.get('kind')} scaler, std "
                              f"{trained.get('std', [0])[0]:.4g}) than this recipe's "
                              f"({mine['kind']}, std {mine['std'][0]:.4g}); translate this "
                              f"data's records with a translator trained on them")
        # a saved student names its front end: eval and export rebuild the same input
        student.config.translate = {"checkpoint": str(up.checkpoint),
                                    "source_rate": up.source_rate,
                                    "weights": local_weights(str(up.checkpoint))}
    return student


# train settings that change what training produces (not: checkpoint_every,
# keep_checkpoints, num_workers, which only change how it is done)
RESULT_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_ratio", "grad_accum",
               "grad_clip", "mixed_precision", "early_stopping", "augment")


def train_settings(recipe: Recipe, teacher: bool = False) -> dict[str, Any]:
    """The training settings a job's result depends on; for the teacher, with its own
    ``teacher.epochs`` / ``teacher.lr`` when set. Fingerprints and stage hashes use these,
    so changing a bookkeeping setting never invalidates finished training. The teacher's
    training draws its augmentation afresh every epoch, so ``augment.views`` (the students'
    fixed draws) is not among its settings."""
    d = to_dict(recipe.train, hashing=True)
    out = {k: d[k] for k in RESULT_KEYS}
    # the printout augmentation concerns image students only (their printout_settings)
    out["augment"] = {k: v for k, v in out["augment"].items() if k != "printout"}
    if teacher:
        out["augment"] = {k: v for k, v in out["augment"].items() if k != "views"}
        t = recipe.teacher
        out["epochs"] = t.epochs if t.epochs is not None else out["epochs"]
        out["lr"] = t.lr if t.lr is not None else out["lr"]
        out["batch_size"] = t.batch_size if t.batch_size is not None else out["batch_size"]
    return out


def local_weights(name_or_path: str) -> dict[str, str]:
    """SHA-256 of each safetensors file of a local model folder ({} for a hub id or a
    preset name): a teacher re-made in place (``ecg-distill pretrain --force``) is then a
    new teacher to every fingerprint."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return {}
    return {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}


def teacher_settings(recipe: Recipe) -> dict[str, Any]:
    """Everything the trained teacher depends on besides the data."""
    t = {k: v for k, v in to_dict(recipe.teacher).items()
         if k not in ("epochs", "lr", "batch_size")}
    t["view"].pop("translate", None)  # a student's setting only (0.4): never a teacher's
    if zoo.folder(recipe.teacher.name_or_path) is not None:  # a shipped teacher: its weights
        t["shipped"] = zoo.card(recipe.teacher.name_or_path)["files"]
    elif local_weights(recipe.teacher.name_or_path):  # a local folder (e.g. a pretraining's
        t["weights"] = local_weights(recipe.teacher.name_or_path)  # best/), rewritable in place
    return {"seed": recipe.seed, "teacher": t, "train": train_settings(recipe, teacher=True)}


def student_settings(recipe: Recipe) -> dict[str, Any]:
    """What a student's training depends on besides its own spec, the data and the teacher
    (the labeled share only when below 1, so runs made before it existed keep theirs)."""
    out: dict[str, Any] = {"seed": recipe.seed, "train": train_settings(recipe)}
    if recipe.data.label_fraction < 1.0:
        out["label_fraction"] = recipe.data.label_fraction
    return out


def printout_settings(recipe: Recipe, spec: StudentConfig) -> dict[str, Any]:
    """What an image student's training depends on besides the signals: the printout it
    reads (the render settings) and its augmentation; nothing for a signal student (so its
    fingerprint is what it was)."""
    if not student_reads_images(spec):
        return {}
    out: dict[str, Any] = {"printout": dataclasses.asdict(render_config(recipe.data))}
    if recipe.train.augment.printout > 0:
        out["printout_augment"] = recipe.train.augment.printout
    return out


def distill_settings(recipe: Recipe) -> dict[str, Any]:
    """The ``distill`` section as hashes read it (:meth:`DistillConfig.hash_dict`)."""
    return {"distill": recipe.distill.hash_dict()}


# ---------------------------------------------------------------- inputs


def teacher_inputs(recipe: Recipe) -> Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]:
    """Batch -> the teacher's keyword inputs (its adapter's ``batch_inputs``)."""
    return teacher_class(recipe).batch_inputs


# per-student settings added after 0.1, left out of a fingerprint at these values so that
# runs made before they existed stay valid
_SPEC_DEFAULTS = {"epochs": None, "lr": None, "train_mode": "full"}


def _spec_key(spec: StudentConfig) -> dict[str, Any]:
    """A student spec as its training fingerprint sees it: unset per-student overrides
    (``epochs``, ``lr``), full training and settings added later at their defaults (a view
    without a translator) are left out, so runs made before they existed stay valid; the
    LoRA settings count only when training with LoRA; a translator by its weights too."""
    out = {k: v for k, v in to_dict(spec).items()
           if not (k in _SPEC_DEFAULTS and v == _SPEC_DEFAULTS[k])}
    if spec.train_mode != "lora":
        out = {k: v for k, v in out.items() if k not in ("lora_rank", "lora_alpha")}
    if spec.view.translate is None:
        out["view"].pop("translate", None)
    else:
        out["translator"] = local_weights(spec.view.translate)
    return out


def _teacher_split(jd: JobData, train: bool, images: np.ndarray | None = None):
    """(views, extras, render, transform) of a split carrying the teacher's input: the
    cached images (``images``, default the data's), or images drawn live from the
    augmented record when augmenting."""
    recipe = jd.recipe
    aug = augmentation(recipe)
    live = train and aug.active
    views = {"teacher": jd.views["teacher"]}
    extra: dict[str, Any] = {}
    render = None
    if jd.teacher_class.reads_images():
        if live:
            render = render_config(recipe.data)
        else:
            extra["image"] = jd.images if images is None else images
    return views, extra, render, (aug if live else None)


# ---------------------------------------------------------------- teacher


def teacher_job(jd: JobData) -> TrainJob:
    """Fine-tune (``full``), adapt (``lora``) or fit the head of (``head``) the teacher."""
    recipe = jd.recipe
    if recipe.teacher.train_mode == "frozen":
        raise RecipeError("teacher.train_mode is frozen: there is nothing to train")
    set_seed(recipe.seed)
    with process_state().main_process_first():  # a preset or hub download is made once
        teacher = build_teacher(recipe, jd.classes)
    inputs = teacher_inputs(recipe)
    sets = {}
    for split, train in (("train", True), ("val", False)):
        views, extras, render, aug = _teacher_split(jd, train)
        sets[split] = jd.data.split(split, views, extras=extras, render=render, transform=aug,
                                    seed=recipe.seed)

    def loss_fn(model: nn.Module, batch: Mapping[str, Any]):
        return model(labels=batch["labels"], **inputs(batch)).loss, {}

    def logits_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return model(**inputs(batch)).logits

    return TrainJob(
        name=ModelId.teacher().name, stage="teacher", model=teacher, train_set=sets["train"],
        val_set=sets["val"],
        loss_fn=loss_fn, logits_fn=logits_fn,
        save_model=lambda m, f, sd: m.save_pretrained(f, state_dict=sd),
        fingerprint=stable_hash({"job": "teacher", "data": jd.data.fingerprint,
                           **teacher_settings(recipe)}),
        class_names=jd.classes)


def load_frozen_teacher(jd: JobData, run_dir: Path) -> nn.Module:
    """The teacher distillation reads: the teacher stage's best model, or, with
    ``train_mode: frozen``, the recipe's teacher as it is."""
    recipe = jd.recipe
    if recipe.teacher.train_mode == "frozen":
        set_seed(recipe.seed)  # a freshly built head is the same in every process and run
        with process_state().main_process_first():
            teacher = build_teacher(recipe, jd.classes)
        saved = saved_teacher_folder(recipe.teacher.name_or_path) is not None
        if (not saved and recipe.distill.weights.get("kd", 0) > 0
                and recipe.distill.alpha > 0):
            print(f"warning: teacher.train_mode is frozen and {recipe.teacher.name_or_path} is "
                  f"not a saved teacher, so its classification head is untrained: the kd term "
                  f"distils random logits (train it with train_mode: head, or point "
                  f"teacher.name_or_path at a trained teacher folder)")
    else:
        best = RunLayout(run_dir).teacher_best
        if not (best / "teacher.json").exists():
            raise RecipeError(f"no trained teacher in {best}; run `ecg-distill teacher` on the "
                              f"recipe first (or set teacher.train_mode: frozen)")
        teacher = teachers.load(best, train_mode="frozen")
    return teacher.eval()


# ---------------------------------------------------------------- students


def student_sets(jd: JobData, spec: StudentConfig, extras: Mapping[str, Any] | None = None,
                  with_teacher: bool = False, distill: bool = False,
                  transfer_extras: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train and validation sets of a student's view. The training set may also carry the
    teacher's cached outputs (``extras``) or, with ``with_teacher``, the teacher's own input
    (for a live teacher); validation reads the student's view alone.

    With ``data.label_fraction`` < 1 a student trains on the labeled subset only (the
    baseline) or (``distill``) on it and the transfer records: the training records whose
    labels are hidden and the extra records of ``distill.transfer`` (with the teacher's
    outputs on them, ``transfer_extras``), each item flagged ``labeled`` 1 or 0.

    With ``train.augment.views`` = K every training item is one of K fixed augmented draws
    of its record (baseline and distillation alike); the cached teacher outputs are then
    per draw (:class:`~distill.data.dataset.PerDraw`), read at the item's draw."""
    recipe = jd.recipe
    key = student_key(spec)
    printout = student_reads_images(spec)

    def part(data: Any, rows: np.ndarray | None, arrays: Mapping[str, Any] | None,
             images: np.ndarray | None) -> ECGSplit:
        views = {key: jd.views[key]}
        render, transform, extra, draws = None, None, dict(arrays or {}), 0
        if with_teacher:
            if augment_draws(recipe):
                raise ValueError("the teacher runs live only with fresh draws "
                                 "(train.augment.views: 0); with fixed views pass its cached "
                                 "outputs on them (build_teacher_cache)")
            t_views, t_extras, render, transform = _teacher_split(jd, True, images)
            views.update(t_views)
            extra.update(t_extras)
        elif augmentation(recipe).active:
            transform = augmentation(recipe)
            draws = augment_draws(recipe)
        if printout and render is None:  # an image student reads the record's printout
            extra["image"] = images  # (drawn live with a live image teacher's: the same)
        if rows is None:
            return data.split("train", views, extras=extra, render=render, transform=transform,
                              seed=recipe.seed, draws=draws)
        return ECGSplit(data, rows, views, extras=extra, render=render, transform=transform,
                        seed=recipe.seed, draws=draws)

    val = jd.data.split("val", {key: jd.views[key]}, seed=recipe.seed,
                        extras={"image": jd.images} if printout else None)
    labeled = part(jd.data, jd.labeled_rows, extras, jd.images)
    if not jd.mixed or not distill:
        return {"train": labeled, "val": val}
    parts = [Flagged(labeled, labeled=True)]
    t = recipe.distill.transfer
    if t.rest and jd.unlabeled_rows is not None and len(jd.unlabeled_rows):
        parts.append(Flagged(part(jd.data, jd.unlabeled_rows, extras, jd.images), labeled=False))
    if jd.transfer is not None:
        everything = np.arange(len(jd.transfer), dtype=np.int64)
        parts.append(Flagged(part(jd.transfer, everything, transfer_extras, jd.transfer_images),
                             labeled=False))
    return {"train": MixedSet(parts), "val": val}


def baseline_job(jd: JobData, spec: StudentConfig) -> TrainJob:
    """A student trained on the labels alone (the comparison for distillation)."""
    recipe = jd.recipe
    set_seed(recipe.seed)
    student = _student(jd, spec)
    inputs = student_inputs(spec)
    train_inputs = student_train_inputs(recipe, spec)
    sets = student_sets(jd, spec)

    def loss_fn(model: nn.Module, batch: Mapping[str, Any]):
        return model(labels=batch["labels"], **train_inputs(batch)).loss, {}

    def logits_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return model(**inputs(batch)).logits

    return TrainJob(
        name=ModelId.student("baseline", spec).name, stage="baseline", model=student,
        train_set=sets["train"],
        val_set=sets["val"], loss_fn=loss_fn, logits_fn=logits_fn,
        save_model=lambda m, f, sd: m.save_pretrained(f, state_dict=sd),
        fingerprint=stable_hash({"job": "baseline", "student": _spec_key(spec),
                                 "data": jd.data.fingerprint, **student_settings(recipe),
                                 **printout_settings(recipe, spec)}),
        class_names=jd.classes)


class DistillationModule(nn.Module):
    """The trained part of distillation: the student and the objective's learnable losses
    (projections, cross-attention), optimised together; only the student is exported."""

    def __init__(self, student: nn.Module, objective: nn.Module):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, inputs: Mapping[str, torch.Tensor], teacher_out: ECGModelOutput | None,
                labels: torch.Tensor, labeled: torch.Tensor | None = None,
                teacher_index: torch.Tensor | None = None):
        """-> ObjectiveOutput(total, terms, aux) of the batch; ``inputs`` are the student's
        keyword inputs (``signal`` or ``image``); ``labeled`` [B] marks the records whose
        labels the task term may read (None: all); ``teacher_index`` [B] names the records
        whose fixed teacher features the objective may keep (its ``teacher_memo``)."""
        batch: dict[str, Any] = {"labels": labels}
        if labeled is not None:
            batch["labeled"] = labeled
        if teacher_index is not None:
            batch["teacher_index"] = teacher_index
        return self.objective(self.student(**inputs), teacher_out, batch)


def cached_teacher_output(batch: Mapping[str, Any], token_leads: torch.Tensor,
                          codebook_size: int = 0) -> ECGModelOutput:
    """The teacher's ModelOutput rebuilt from the cache entries of a batch (fp32; int8
    tokens dequantized; its token mask and code distributions where stored, the latter
    expanded from their top codes)."""
    codes = None
    if "teacher.code_idx" in batch:
        codes = expand_codes(batch["teacher.code_idx"], batch["teacher.code_logp"],
                             codebook_size)
    mask = batch.get("teacher.token_mask")
    return ECGModelOutput(logits=batch["teacher.logits"].float(),
                          tokens=decode_tokens(batch["teacher.tokens"],
                                               batch.get("teacher.token_scale")),
                          pooled=batch["teacher.pooled"].float(),
                          token_leads=token_leads.to(batch["teacher.tokens"].device),
                          token_mask=None if mask is None else mask.bool(),
                          code_logits=codes)


def set_code_levels(teacher: nn.Module, recipe: Recipe) -> None:
    """Ask the teacher for the code distributions the recipe's ``codes`` term reads (in the
    recipe or one of its ablations); RecipeError when it is not a tokenized teacher."""
    levels = code_levels(recipe)
    if levels and not getattr(teacher, "gives_codes", lambda: False)():
        where = ("distill.weights.codes" if recipe.distill.weights.get("codes", 0) > 0
                 else "ablations.runs (with_codes)")
        raise RecipeError(f"{where}: the codes term needs a tokenized teacher (teacher.kind: "
                          f"foundation on a hypnos model); {recipe.teacher.kind} "
                          f"{recipe.teacher.name_or_path} gives no code distributions")
    teacher.code_levels = levels


def code_levels(recipe: Recipe) -> int:
    """How many residual code levels of its code distributions the teacher gives per token:
    the ``codes`` term's ``distill.codes.levels`` when the recipe or one of its ablations
    weights that term, else 0 (a tokenized teacher computes them only then)."""
    d = recipe.distill
    runs = [dict(d.weights)] + [AblationConfig.weights(n, dict(d.weights))
                                for n in recipe.ablations.runs]
    if d.alpha <= 0 or not any(w.get("codes", 0.0) > 0 for w in runs):
        return 0
    return int(loss_family("codes").make_config(d.losses.get("codes")).levels)


def distill_job(jd: JobData, spec: StudentConfig, teacher: nn.Module,
                cache: TeacherOutputs | DrawnOutputs | None, model_id: ModelId | None = None,
                transfer_cache: TeacherOutputs | DrawnOutputs | None = None) -> TrainJob:
    """A student trained with the recipe's objective against the frozen teacher.

    Args:
        jd: the loaded data.
        spec: the student.
        teacher: the frozen teacher (used live when ``cache`` is None: augmentation drawn
            afresh every epoch).
        cache: :class:`distill.engine.teacher_cache.TeacherOutputs` (per draw,
            :class:`~distill.engine.teacher_cache.DrawnOutputs`, with
            ``train.augment.views``), or None to run the teacher live.
        model_id: the model trained (default the student's distillation; an ablation names
            its own).
        transfer_cache: the teacher's outputs on the extra transfer records (with
            ``cache``, when the recipe has them).
    """
    recipe = jd.recipe
    set_seed(recipe.seed)
    student = _student(jd, spec)
    s_inputs = student_inputs(spec)
    s_train_inputs = student_train_inputs(recipe, spec)
    t_inputs = teacher_inputs(recipe)
    set_code_levels(teacher, recipe)
    extras = cache.extras() if cache is not None else None
    if cache is not None and jd.transfer is not None and transfer_cache is None:
        raise ValueError("distill_job: the recipe has extra transfer records; pass the "
                         "teacher's outputs on them (transfer_cache)")
    draws = augment_draws(recipe)
    for c in (cache, transfer_cache):
        if c is not None and len(getattr(c, "draws", ())) != draws:
            where = ", ".join(str(e.folder) for e in getattr(c, "draws", [c]))
            raise ValueError(f"distill_job: train.augment.views is {draws}; the teacher "
                             f"outputs given ({where}) cover "
                             f"{len(getattr(c, 'draws', ()))} augmented views per record")
    sets = student_sets(jd, spec, extras=extras, with_teacher=cache is None, distill=True,
                         transfer_extras=transfer_cache.extras() if transfer_cache else None)
    probe = sets["train"][0]
    with torch.no_grad():
        s_dim = student.eval()(**{k: v[None] for k, v in s_inputs(probe).items()}).tokens.shape[-1]
        if cache is not None:
            t_dim, t_codes = cache.tokens.shape[-1], cache.code_shape
        else:
            t_out = teacher(**{k: v[None] for k, v in t_inputs(probe).items()})
            t_dim = t_out.tokens.shape[-1]
            t_codes = None if t_out.code_logits is None else tuple(t_out.code_logits.shape[2:])
    student.train()
    s_leads = getattr(student.config, "lead_ids", None)  # a printout student has none
    reduced = getattr(cache, "token_format", "fp16")
    objective = build_objective(recipe, s_dim, t_dim, t_codes,
                                None if s_leads is None else tuple(s_leads),
                                teacher_form=TEACHER_FORM.get(reduced))
    if reduced in TEACHER_FORM and "mhca" in objective.losses:  # (an ablation may weight it)
        raise RecipeError(f"distill.cached_tokens: {reduced} stores the teacher tokens reduced, "
                          f"and mhca reads them whole (its keys are learnt from every "
                          f"feature); weight mhca 0 in every run, or use fp16 or int8")
    fit_key_basis(objective, jd, cache)
    # a record's cached teacher outputs never change (one draw, no transfer records with
    # indices of their own): what the terms derive from them with fixed maps is kept
    memo = isinstance(cache, TeacherOutputs) and transfer_cache is None and jd.transfer is None
    if memo:
        objective.keep_teacher_features(cache.tokens.shape[0])
    module = DistillationModule(student, objective)
    device = {"value": torch.device("cpu")}

    def teacher_out(batch: Mapping[str, Any]) -> ECGModelOutput:
        if cache is not None:
            return cached_teacher_output(batch, cache.token_leads, cache.codebook_size)
        with torch.no_grad():
            return teacher(**{k: v.to(device["value"]) for k, v in t_inputs(batch).items()})

    def loss_fn(model: nn.Module, batch: Mapping[str, Any]):
        out = model(s_train_inputs(batch), teacher_out(batch), batch["labels"],
                    batch.get("labeled"), batch["index"] if memo else None)
        return out.total, out.terms

    def logits_fn(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        inner = getattr(model, "module", model)  # DDP keeps the module under .module
        return inner.student(**s_inputs(batch)).logits

    def on_device(dev: torch.device) -> None:
        device["value"] = dev
        if cache is None and not getattr(teacher, "quantized", False):
            teacher.to(dev)

    teacher_id = cache.key if cache is not None else weights_hash(teacher)
    if transfer_cache is not None:
        teacher_id = f"{teacher_id}+{transfer_cache.key}"
    elif jd.transfer is not None:
        teacher_id = f"{teacher_id}+{jd.transfer.fingerprint}"
    model_id = model_id or ModelId.student("distill", spec)
    return TrainJob(
        name=model_id.name, stage=model_id.kind, model=module, train_set=sets["train"],
        val_set=sets["val"], loss_fn=loss_fn, logits_fn=logits_fn,
        save_model=_save_distilled, on_device=on_device,
        fingerprint=stable_hash({"job": "distill", "student": _spec_key(spec),
                                 "teacher": teacher_id, "data": jd.data.fingerprint,
                                 **student_settings(recipe), **distill_settings(recipe),
                                 **printout_settings(recipe, spec)}),
        class_names=jd.classes)


KEY_BASIS_RECORDS = 256  # training records whose teacher tokens fit mhca's key basis


def fit_key_basis(objective: nn.Module, jd: JobData,
                  cache: TeacherOutputs | DrawnOutputs | None) -> None:
    """With ``distill.mhca.teacher_rank``, fit mhca's key basis to the cached teacher tokens
    of the first ``KEY_BASIS_RECORDS`` training records (by index; the first draw's), the
    same on every process, before training. Without a cache (a live teacher) mhca fits it
    to the first batch it sees."""
    losses = getattr(objective, "losses", None)
    mhca = losses["mhca"] if losses is not None and "mhca" in losses else None
    if mhca is None or not getattr(mhca, "low_rank_keys", False) or cache is None:
        return
    entry = cache.draws[0] if isinstance(cache, DrawnOutputs) else cache
    rows = np.sort(np.asarray(jd.data.splits["train"]))[:KEY_BASIS_RECORDS]
    scale = None if entry.token_scale is None else torch.from_numpy(
        np.asarray(entry.token_scale[rows]))
    tokens = decode_tokens(torch.from_numpy(np.asarray(entry.tokens[rows])), scale)
    mask = None if entry.token_mask is None else torch.from_numpy(
        np.asarray(entry.token_mask[rows]))
    mhca.fit_key_basis(tokens, mask)


OBJECTIVE_FILE = "objective.safetensors"


def _save_distilled(module: DistillationModule, folder: Path,
                    state_dict: dict[str, Any] | None) -> None:
    """The student (a plain student folder) and, beside it, the objective's learnt
    projections (``objective.safetensors``: the report draws transport plans with them;
    export leaves them out)."""
    module.student.save_pretrained(folder, state_dict=_sub(state_dict, "student."))
    objective = _sub(state_dict, "objective.") or module.objective.state_dict()
    if objective:
        save_file({k: v.detach().contiguous().cpu() for k, v in objective.items()},
                  str(folder / OBJECTIVE_FILE))


def ablation_recipe(recipe: Recipe, name: str) -> Recipe:
    """The recipe with the distillation weights of ablation ``name``
    (:meth:`distill.recipe.AblationConfig.weights`)."""
    r = copy.deepcopy(recipe)
    r.distill.weights = AblationConfig.weights(name, r.distill.weights)
    return r


def _sub(state_dict: dict[str, Any] | None, prefix: str) -> dict[str, Any] | None:
    """The entries under ``prefix`` (prefix removed), or None."""
    if state_dict is None:
        return None
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def teacher_cache_key(jd: JobData, teacher: nn.Module, data: Any = None,
                      draw: int | None = None) -> str:
    """The cache key of this teacher's outputs on this data (default the run's) with these
    input settings; with ``draw``, on that fixed augmented draw of every record."""
    recipe = jd.recipe
    data = jd.data if data is None else data
    inputs: dict[str, Any] = {"kind": recipe.teacher.kind}
    if jd.teacher_class.reads_images():
        inputs["render"] = dataclasses.asdict(render_config(recipe.data))
    else:
        view = jd.views["teacher"]  # (a teacher's view is never upsampled)
        inputs["view"] = {"leads": view.leads, "sampling_rate": view.sampling_rate}
    if draw is not None:
        inputs["augment"] = {**dataclasses.asdict(augmentation(recipe)), "seed": recipe.seed,
                             "draw": draw}
    if code_levels(recipe):  # absent otherwise: entries made before the codes term stay valid
        inputs["codes"] = {"levels": code_levels(recipe), "top": CODE_TOP}
    fmt = token_format(recipe).key()
    if fmt is not None:  # likewise: fp16 entries keep their keys
        inputs["tokens"] = fmt
    return cache_key(teacher, data.fingerprint, inputs)


# how a reduced cache's tokens reach the ot term (its teacher_form)
TEACHER_FORM = {"projected": "projected", "lead_mean": "normed"}


def token_format(recipe: Recipe) -> TokenFormat:
    """How the recipe's teacher cache stores tokens (``distill.cached_tokens``): for
    ``projected``, the fixed map of the ``ot`` term (layer norm, then a semi-orthogonal
    [ot.dim, D_t] matrix drawn from the recipe's seed), which that term then reads from
    the entry."""
    name = recipe.distill.cached_tokens
    if name != "projected":
        return TokenFormat(name)
    return TokenFormat(name, dim=recipe.distill.losses["ot"].dim, seed=recipe.seed)


def build_teacher_cache(jd: JobData, teacher: nn.Module, progress: bool = True,
                        batch_size: int | None = None, rebuild: bool = False,
                        transfer: bool = False, collective: bool = False
                        ) -> TeacherOutputs | DrawnOutputs:
    """The teacher's outputs on every record (with ``transfer``, on every extra transfer
    record), from the cache or computed now (on this process's device: the GPU when there
    is one). With ``train.augment.views`` = K, its outputs on each of the K fixed augmented
    draws of every record (the signal augmented, then rendered for an image teacher).
    ``collective``: every process of the run calls this together, and a missing entry is
    filled by all of them, each its share of the records (then joined into one entry)."""
    recipe = jd.recipe
    set_code_levels(teacher, recipe)
    data, images = (jd.transfer, jd.transfer_images) if transfer else (jd.data, jd.images)
    draws = augment_draws(recipe)
    # the keys first: the weights' identity is read from the files the teacher was loaded
    # from while its tensors are the ones loaded (moving them to a device makes new ones)
    keys = ([teacher_cache_key(jd, teacher, data)] if not draws else
            [teacher_cache_key(jd, teacher, data, draw=d) for d in range(draws)])
    fmt = token_format(recipe)
    device = process_state().device
    if getattr(teacher, "quantized", False):  # placed by bitsandbytes when loaded
        device = next(teacher.parameters()).device
    else:
        teacher.to(device)

    views = {"teacher": jd.views["teacher"]}
    state = process_state()
    common = dict(cache_dir=recipe.data.cache_dir, progress=progress, rebuild=rebuild,
                  batch_size=batch_size or recipe.train.batch_size, device=device,
                  processes=state if collective and state.num_processes > 1 else None)
    if not draws:
        reads = images is not None and jd.teacher_class.reads_images()
        dataset = data.split("all", views, extras={"image": images} if reads else None)
        return teacher_outputs(teacher, dataset, teacher_inputs(recipe), key=keys[0],
                               fmt=fmt, **common)
    render = render_config(recipe.data) if jd.teacher_class.reads_images() else None
    out = []
    for d in range(draws):
        dataset = data.split("all", views, transform=augmentation(recipe), render=render,
                             seed=recipe.seed, draws=draws, draw=d)
        out.append(teacher_outputs(teacher, dataset, teacher_inputs(recipe), key=keys[d],
                                   desc=f"teacher outputs, view {d + 1}/{draws}", fmt=fmt,
                                   **common))
    return DrawnOutputs(out)
