"""The recipe's schema: one dataclass per section, each field with its type, range and help.

A recipe says everything a run does: the data, the teacher, the students, the distillation
objective, training, quantization and export. :mod:`distill.recipe.load` reads the YAML,
applies the command-line overrides and builds these dataclasses; an unknown key, a wrong
type or an out-of-range value stops it with one line naming the key path::

    unknown key 'data.samplng_rate'; did you mean 'data.sampling_rate'?

Names that registries own are checked against them, not repeated here: student families
and sizes (:mod:`students`), teacher kinds (:mod:`teachers`) and loss families
(:mod:`distill.losses`, whose config dataclasses are the ``distill.<loss>`` sections).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

import students
import teachers
from distill.core.errors import DataError, RecipeError
from distill.core.leads import lead_indices
from distill.data.synth import patient_id_range
from distill.core.schema import closest, spec, to_dict, to_hash_dict, unknown_key
from distill.losses import loss_families
from distill.models.translator import TranslateConfig
from students._masked import (check_pretraining_options, pretraining_families,
                              pretraining_sizes)

Task = Literal["all", "diagnostic", "subdiagnostic", "superdiagnostic", "form", "rhythm",
               "snomed"]


@dataclass
class SyntheticConfig:
    """The embedded default: a synthetic data set in the PTB-XL layout, generated on first use."""

    records: int = spec(2000, help="number of records to generate", ge=20, le=1_000_000)
    seed: int = spec(0, help="generator seed (same seed, same files)", ge=0)
    first_patient_id: int = spec(1, help="lowest patient id: sets whose id ranges do not "
                                 "overlap share no patient", ge=1)
    rates: list[int] = spec(default_factory=lambda: [100, 500],
                            help="sampling rates written (PTB-XL stores 100 and 500 Hz)")
    generator: int = spec(1, help="generator version: 1 (the default, and the shipped "
                          "teacher's corpus) or 2 (calibrated against real PTB-XL features: R-wave "
                          "progression, noise, rate; benchmarks/realism.py)", ge=1, le=2,
                          since="0.5")

    def validate(self, path: str) -> None:
        bad = [r for r in self.rates if r not in (100, 500)] or ([] if self.rates else ["none"])
        if bad:
            raise RecipeError(f"{path}.rates: {bad[0]} is not a PTB-XL rate (100 or 500)")


@dataclass
class FoldsConfig:
    """PTB-XL's recommended split: strat_fold 1-8 train, 9 validation, 10 test."""

    train: list[int] = spec(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8], ge=1, le=10)
    val: list[int] = spec(default_factory=lambda: [9], ge=1, le=10)
    test: list[int] = spec(default_factory=lambda: [10], ge=1, le=10)

    def validate(self, path: str) -> None:
        seen: dict[int, str] = {}
        for split in ("train", "val", "test"):
            folds = getattr(self, split)
            if not folds:
                raise RecipeError(f"{path}.{split}: must name at least one fold")
            for fold in folds:
                if fold in seen:
                    raise RecipeError(
                        f"{path}.{split}: fold {fold} is already in {path}.{seen[fold]}"
                    )
                seen[fold] = split


@dataclass
class ViewConfig:
    """What one consumer (teacher or student) sees of a record: a lead subset and a rate."""

    leads: list[str] | None = spec(None, help="lead subset in any case ('I', 'avr'); null = all 12")
    sampling_rate: int | None = spec(None, help="Hz; null = data.sampling_rate", ge=10, le=2000)
    translate: str | None = spec(
        None, help="a student's view only: a translator folder (ecg-distill translate: "
                   "RUN/translator/best); the leads are read at its source rate (25 Hz) and "
                   "the student reads its upsampled output (sampling_rate: unset, or the "
                   "translator's source or target rate)",
        since="0.4")

    def validate(self, path: str) -> None:
        _check_leads(self.leads, f"{path}.leads")
        if self.translate is not None and path.startswith("teacher"):
            raise RecipeError(f"{path}.translate: only a student's view is translated")


@dataclass
class ImageConfig:
    """The 12-lead image an image teacher reads (3x4 layout plus a lead II rhythm strip)."""

    height: int = spec(224, help="pixels", ge=64, le=4096)
    width: int = spec(224, help="pixels", ge=64, le=4096)
    patch_size: int = spec(16, help="the vision tower's patch size (for the patch-to-lead map)",
                           ge=1, le=512)
    grid: bool = spec(True, help="draw the ECG-paper grid")

    def validate(self, path: str) -> None:
        for side in ("height", "width"):
            if getattr(self, side) % self.patch_size:
                raise RecipeError(
                    f"{path}.{side}: {getattr(self, side)} is not a multiple of "
                    f"{path}.patch_size={self.patch_size}"
                )


@dataclass
class DataConfig:
    """Where records come from and how they are labelled, split and scaled."""

    path: str | None = spec(None, help="a PTB-XL-layout folder; null = the synthetic default")
    format: Literal["ptbxl", "cinc"] = spec("ptbxl", help="folder layout")
    synthetic: SyntheticConfig = spec(default_factory=SyntheticConfig)
    task: Task = spec("superdiagnostic", help="PTB-XL benchmark task; with format cinc the "
                                              "SNOMED codes are mapped onto it, or kept as "
                                              "the classes with task snomed")
    sampling_rate: int = spec(100, help="Hz of the signals served (PTB-XL: 100 or 500 stored)",
                              ge=10, le=2000)
    leads: list[str] | None = spec(None, help="lead subset served by default; null = all 12")
    folds: FoldsConfig = spec(default_factory=FoldsConfig)
    min_samples: int = spec(0, help="drop classes with at most this many records", ge=0)
    scaler: Literal["global", "per_lead", "none"] = spec(
        "global", help="standard scaler fitted on the training folds only")
    on_bad_record: Literal["error", "skip"] = spec(
        "error", help="a missing, corrupt, NaN or flat record: stop, or skip it with a warning")
    on_flat_lead: Literal["error", "skip", "mask"] = spec(
        "error", help="a record with a flat (constant) lead: error (a bad record, as "
                      "on_bad_record says), skip it with a warning, or mask: keep it with the "
                      "lead marked missing (zeros in every view, and a per-view lead mask in "
                      "the batch that lead-token models honour)", since="0.4")
    cache_dir: str | None = spec(None, help="decoded-signal/image cache; null = $ECG_DISTILL_CACHE "
                                            "or ~/.cache/ecg-distill")
    image: ImageConfig = spec(default_factory=ImageConfig)
    label_fraction: float = spec(
        1.0, help="students see the labels of this share of the training patients (a "
                  "stratified, patient-grouped, seeded subset; the teacher sees all); the rest "
                  "join distill.transfer", gt=0, le=1, since="0.2")

    def validate(self, path: str) -> None:
        _check_leads(self.leads, f"{path}.leads")
        if self.task == "snomed" and self.format != "cinc":
            raise RecipeError(f"{path}.task: snomed (SNOMED CT codes as classes) needs "
                              f"{path}.format: cinc; PTB-XL folders take a PTB-XL task")
        stored = self.synthetic.rates
        needed = 100 if self.sampling_rate <= 100 else 500  # the folder it is read from
        if self.path is None and self.format == "ptbxl" and needed not in stored:
            raise RecipeError(f"{path}.sampling_rate: {self.sampling_rate} Hz is read from "
                              f"{needed} Hz records, not among the synthetic set's rates "
                              f"{stored} ({path}.synthetic.rates)")


@dataclass
class TeacherConfig:
    """The large model distilled from (adapters come with the models stage)."""

    kind: str = spec("vlm", help="the adapter kind (teachers.KINDS): vlm (image-text), signal "
                                 "(speech-style encoder) or foundation (a pretrained CSFM or "
                                 "LAMAE)")
    name_or_path: str = spec("tiny", help="hub id, local folder, or 'tiny' (built locally)")
    train_mode: Literal["full", "lora", "head", "frozen"] = spec(
        "full", help="how the teacher is adapted to the labels")
    load_in: Literal["none", "8bit", "4bit"] = spec("none", help="bitsandbytes quantized loading")
    tokens: Literal["vision", "language"] = spec(
        "vision", help="VLM token features: projected visual tokens or LM hidden states at image positions")
    prompt: str = spec("Classify this 12-lead ECG.", help="text given with the image")
    pool: Literal["last", "image-mean"] = spec(
        "last", help="vlm: what the head reads: the LM's hidden state at the last prompt "
                     "position, or the mean of its hidden states at the image positions")
    view: ViewConfig = spec(default_factory=ViewConfig)
    trust_remote_code: bool = spec(False, help="run code shipped with a hub model (off by default)")
    lora_rank: int = spec(16, help="LoRA adapter rank", ge=1, le=1024)
    lora_alpha: int = spec(32, help="LoRA scaling numerator (update scaled by alpha / rank)", ge=1)
    lora_dropout: float = spec(0.05, ge=0, lt=1)
    seconds: float = spec(5.0, help="signal teacher: seconds of each record it reads "
                                    "(HuBERT-ECG was trained on 5 s)", gt=0, le=60)
    epochs: int | None = spec(None, help="teacher fine-tuning epochs (null = train.epochs)", ge=1)
    lr: float | None = spec(None, help="teacher learning rate (null = train.lr)", gt=0, lt=1)
    batch_size: int | None = spec(None, help="teacher batch size (null = train.batch_size)", ge=1)

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.kind" if path else "kind", self.kind, teachers.KINDS)


@dataclass
class StudentConfig:
    """One compact student: a family and a size preset."""

    family: str = spec("xresnet1d", help="student architecture (students.FAMILIES)")
    size: str = spec("tiny", help="size preset (students.SIZES)")
    view: ViewConfig = spec(default_factory=ViewConfig)
    epochs: int | None = spec(None, help="this student's epochs (null = train.epochs)", ge=1)
    lr: float | None = spec(None, help="this student's learning rate (null = train.lr); "
                                       "transformers from scratch want less than CNNs",
                            gt=0, lt=1)
    train_mode: Literal["full", "lora"] = spec(
        "full", help="full: every weight trains; lora: LoRA adapters on a VLM student's "
                     "language model (merged into the weights when saved)", since="0.2")
    lora_rank: int = spec(8, help="LoRA rank (train_mode: lora)", ge=1, le=512, since="0.2")
    lora_alpha: int = spec(16, help="LoRA scaling numerator (train_mode: lora)", ge=1,
                           since="0.2")

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.family", self.family, students.families())
        _check_choice(f"{path}.size", self.size, students.SIZES)
        if (self.family, self.size) not in students.presets():
            sizes = [s for f, s in students.presets() if f == self.family]
            raise RecipeError(f"{path}.size: {self.family} has no {self.size!r} preset; "
                              f"its sizes: {', '.join(sizes)}")
        if self.train_mode == "lora":
            try:
                students.check_options(self.family, ["lora"])
            except ValueError:
                raise RecipeError(f"{path}.train_mode: lora trains adapters on a VLM student's "
                                  f"language model; {self.family} has none (use full)") from None


def _check_choice(path: str, value: str, choices: Sequence[str]) -> None:
    """The one-line error of a name outside a registry (with the closest name)."""
    if value not in choices:
        hint = closest(value, list(choices))
        extra = f"; did you mean {hint!r}?" if hint else ""
        raise RecipeError(f"{path}: {value!r} is not one of "
                          f"{', '.join(repr(c) for c in choices)}{extra}")


def default_weights() -> dict[str, float]:
    """λ of every registered loss family at its default (EVL-ECG's four terms: 1)."""
    return {f.name: float(f.default_weight) for f in loss_families()}


def _loss_sections() -> dict[str, type]:
    return {f.name: f.config for f in loss_families()}


@dataclass
class TransferConfig:
    """Unlabeled records for the distillation terms: their labels, if any, are never read.

    A distillation batch draws from the labeled training records and the transfer records
    shuffled together (so it holds both in the proportion of the two sets); the label term
    averages over the batch's labeled records only, every distillation term over all.
    """

    rest: bool = spec(True, help="the training records whose labels data.label_fraction "
                                 "hides join the transfer set")
    path: str | None = spec(None, help="a folder of extra records (data.format's layout)")
    synthetic: int = spec(0, help="extra synthetic records generated for the transfer set",
                          ge=0, le=1_000_000)
    seed: int = spec(1, help="seed of the synthetic transfer records", ge=0)
    first_patient_id: int | None = spec(
        None, help="lowest patient id of the synthetic transfer records; null = just above "
                   "the labeled synthetic set's", ge=1)

    def validate(self, path: str) -> None:
        if self.path is not None and self.synthetic:
            raise RecipeError(f"{path}.path and {path}.synthetic: give one source of extra "
                              f"records")

    @property
    def extra(self) -> bool:
        """Whether records outside the labeled data set join."""
        return self.path is not None or self.synthetic > 0


# the loss families of 0.1-0.3 (EVL-ECG's four terms)
ORIGINAL_LOSSES = ("kd", "mhca", "ot", "relation")
# the distill section before the per-loss sections (0.1): flat key -> (loss, field)
LEGACY_DISTILL_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "temperature": (("kd", "temperature"),),
    "ot_reg": (("ot", "reg"),),
    "ot_iters": (("ot", "iters"),),
    "lead_prior": (("ot", "lead_prior"),),
    "mhca_heads": (("mhca", "heads"),),
    "align_dim": (("mhca", "dim"), ("ot", "dim")),
    "relation_criterion": (("relation", "criterion"),),
    "batch_rkd": (("relation", "batch_rkd"),),
}


@dataclass
class DistillConfig:
    """L = (1 - alpha) * L_task + alpha * sum_i lambda_i * L_i (EVL-ECG).

    Besides ``alpha`` and ``weights``, every registered loss family has a section of its
    own, ``distill.<loss>``, whose keys are the fields of its config dataclass (e.g.
    ``distill.kd.temperature``, ``distill.ot.reg``).
    """

    __sections__ = "losses"

    alpha: float = spec(0.5, help="share of the distillation terms", ge=0, le=1)
    weights: dict[str, float] = spec(default_factory=default_weights,
                                     help="lambda of each loss family; a term of weight 0 is "
                                          "not computed")
    losses: dict[str, Any] = spec(default_factory=dict,
                                  help="one section per loss family: distill.<loss>.<key>")
    transfer: TransferConfig = spec(default_factory=TransferConfig, since="0.2")
    cached_tokens: Literal["fp16", "int8", "projected", "lead_mean"] = spec(
        "fp16", help="how the teacher cache stores tokens: fp16 (as given), int8 (per-token "
                     "scales, half the size), projected (after ot's fixed projection: ot and "
                     "relation exact, mhca off), lead_mean (per-lead means for ot's "
                     "teacher_pool: lead, mhca off)", since="0.5")

    @classmethod
    def section_types(cls) -> dict[str, type]:
        return _loss_sections()

    def validate(self, path: str) -> None:
        families = {f.name: f for f in loss_families()}
        for name, value in self.weights.items():
            if name not in families:
                raise unknown_key(f"{path}.weights", name, list(families))
            if value < 0:
                raise RecipeError(f"{path}.weights.{name}: must be >= 0, got {value}")
        ot = self.losses.get("ot")
        if self.cached_tokens == "lead_mean" and self.weights.get("ot", 0) > 0 and \
                getattr(ot, "teacher_pool", "lead") != "lead":
            raise RecipeError(f"{path}.cached_tokens: lead_mean stores one teacher token per "
                              f"lead; set {path}.ot.teacher_pool: lead (what ot then matches)")
        if self.cached_tokens == "projected" and self.weights.get("ot", 0) > 0 and \
                not getattr(ot, "project", True):
            raise RecipeError(f"{path}.cached_tokens: projected stores the tokens after ot's "
                              f"fixed projection; {path}.ot.project must be true")
        if self.cached_tokens in ("projected", "lead_mean") and self.weights.get("mhca", 0) > 0:
            raise RecipeError(
                f"{path}.cached_tokens: {self.cached_tokens} stores the teacher tokens reduced, "
                f"and mhca reads them whole (its keys are learnt from every feature); set "
                f"{path}.weights.mhca: 0, or cached_tokens: fp16 or int8")
        for name, fam in families.items():
            needs = fam.requires_any
            if self.weights.get(name, 0) > 0 and needs and not any(
                    self.weights.get(n, 0) > 0 for n in needs):
                raise RecipeError(
                    f"{path}.weights.{name}: {_requirement(name, needs)}; give "
                    + " or ".join(f"{path}.weights.{n}" for n in needs)
                    + " a weight > 0, or set it to 0")

    def hash_dict(self) -> dict[str, Any]:
        """The section as stage hashes and job fingerprints see it: in the flat layout of
        0.1 (:data:`LEGACY_DISTILL_KEYS`) whenever the settings can be written in it, so
        runs made before the per-loss sections keep their hashes and resume; otherwise
        the section as it is."""
        out = to_hash_dict(self)
        losses = dict(self.losses)
        weights = dict(self.weights)
        for name in [n for n in losses if n not in ORIGINAL_LOSSES]:
            # a family registered later, off and at its defaults, changes nothing a run
            # computes: it stays out, so runs made before it existed keep their hashes
            if weights.get(name, 0.0) <= 0 and to_dict(losses[name]) == to_dict(
                    type(losses[name])()):
                del losses[name], out[name]
                weights.pop(name, None)
                out["weights"] = {k: v for k, v in out["weights"].items() if k != name}
        if set(out) - {"alpha", "weights"} - set(losses):  # a setting 0.1 did not have
            return out
        legacy: dict[str, Any] = {"alpha": self.alpha, "weights": weights}
        used: dict[str, set[str]] = {}
        for key, targets in LEGACY_DISTILL_KEYS.items():
            values = {to_dict(getattr(losses[n], f)) for n, f in targets if n in losses}
            if len(values) != 1 or len(targets) != sum(n in losses for n, _ in targets):
                return out
            legacy[key] = values.pop()
            for n, f in targets:
                used.setdefault(n, set()).add(f)
        if set(losses) != set(used) or set(weights) != set(used):
            return out
        for name, config in losses.items():
            default = to_dict(type(config)())
            if any(v != default[k] for k, v in to_dict(config).items() if k not in used[name]):
                return out
        return legacy


def _requirement(name: str, needs: Sequence[str]) -> str:
    if name == "relation":
        return ("relation matching compares the student with the teacher tokens aligned to "
                "it")
    return f"the {name} term reads what {' or '.join(needs)} computes"


@dataclass
class AugmentConfig:
    """Signal augmentation before every view is cut (all 0 = off). With ``views`` = 0 every
    epoch draws afresh and distillation runs the teacher live on each draw; with
    ``views`` = K the students draw one of K fixed augmented views of each record per epoch
    (the same for baseline and distillation) and the teacher's outputs on all K are cached
    once, so distillation never runs the teacher."""

    noise: float = spec(0.0, help="std of added Gaussian noise, mV", ge=0)
    amplitude: float = spec(0.0, help="amplitude jitter: scale drawn from [1-a, 1+a]", ge=0, lt=1)
    shift: float = spec(0.0, help="largest circular time shift, seconds", ge=0)
    views: int = spec(0, help="fixed augmented views per record whose teacher outputs are "
                              "cached (0 = a fresh draw every epoch, teacher run live)",
                      ge=0, since="0.2")
    printout: float = spec(0.0, help="image students: the share of training printouts "
                                     "perturbed as scans and photos are (each then gets each "
                                     "of grid colour, line width, rotation, scale, blur and "
                                     "lighting with probability 1/2, JPEG 0.15); 0 = clean",
                           ge=0, le=1, since="0.2")

    def validate(self, path: str) -> None:
        if self.views and not (self.noise or self.amplitude or self.shift):
            raise RecipeError(f"{path}.views: {self.views}, but no augmentation is on "
                              f"({path}.noise, amplitude and shift are all 0)")


@dataclass
class TrainConfig:
    """The shared Accelerate loop (teacher fine-tuning, baselines, distillation)."""

    epochs: int = spec(10, ge=1)
    batch_size: int = spec(64, ge=1)
    lr: float = spec(1e-3, gt=0, lt=1)
    weight_decay: float = spec(1e-2, ge=0)
    warmup_ratio: float = spec(0.05, ge=0, lt=1)
    grad_accum: int = spec(1, ge=1)
    grad_clip: float | None = spec(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = spec("no")
    early_stopping: int | None = spec(None, help="epochs without improvement before stopping", ge=1)
    num_workers: int = spec(0, ge=0)
    checkpoint_every: int | None = spec(None, help="also save every N optimiser steps", ge=1)
    keep_checkpoints: int = spec(2, help="newest checkpoints kept (older ones deleted)", ge=1)
    augment: AugmentConfig = spec(default_factory=AugmentConfig)


@dataclass
class EvaluateConfig:
    """Test-fold evaluation (PTB-XL protocol): bootstrap intervals and timings."""

    bootstrap: int = spec(1000, help="bootstrap resamples of the test fold", ge=10)
    seed: int = spec(0, help="seed of the resamples", ge=0)
    level: float = spec(0.95, help="confidence level of the intervals", gt=0, lt=1)
    latency_repeats: int = spec(5, help="timed forward passes per batch size", ge=1)
    stress: bool = spec(True, help="score the models that read printouts on perturbed test "
                                   "printouts too (grid, line width, rotation, scale, blur, "
                                   "JPEG, lighting), when a student reads printouts",
                        since="0.2")


@dataclass
class AblationConfig:
    """Distillation with terms removed, for one student (the report's ablation table).

    An ablation is a weight override: ``no_<loss>`` sets that family's weight to 0,
    ``<loss>_only`` every other family's (a term whose ``requires_any`` terms are all gone
    goes with them), and ``with_<loss>`` turns on a family the recipe leaves off, at its
    registered default weight (1 where that is 0): the way to measure a term the recipe
    does not use.
    """

    runs: list[str] = spec(default_factory=list,
                           help="which ablations to train: no_<loss>, <loss>_only or with_<loss> "
                                "(empty = none)")
    student: int = spec(0, help="index into students of the ablated student", ge=0)

    def validate(self, path: str) -> None:
        names = [f.name for f in loss_families()]
        valid = ([f"no_{n}" for n in names] + [f"{n}_only" for n in names]
                 + [f"with_{n}" for n in names])
        for i, run in enumerate(self.runs):
            _check_choice(f"{path}.runs.{i}", run, valid)

    @staticmethod
    def weights(name: str, weights: dict[str, float]) -> dict[str, float]:
        """The weights of ablation ``name`` (see the class docstring)."""
        out = dict(weights)
        if name.startswith("no_"):
            out[name[3:]] = 0.0
        elif name.endswith("_only"):
            keep = name[:-len("_only")]
            out = {k: (v if k == keep else 0.0) for k, v in out.items()}
        elif name.startswith("with_"):
            fam = next((f for f in loss_families() if f.name == name[5:]), None)
            if fam is None:
                raise RecipeError(f"ablations.runs: unknown loss in ablation {name!r}")
            if out.get(fam.name, 0.0) <= 0:
                out[fam.name] = fam.default_weight if fam.default_weight > 0 else 1.0
        else:
            raise RecipeError(f"ablations.runs: unknown ablation {name!r}")
        for fam in loss_families():
            if (fam.name in out and fam.requires_any
                    and not any(out.get(n, 0) > 0 for n in fam.requires_any)):
                out[fam.name] = 0.0
        return out


@dataclass
class KDQATConfig:
    """Distillation-aware quantization (format ``onnx-int8-qat``): the trained student is
    fine-tuned under fake int8 quantization with a distillation loss, then exported and
    quantized like ``onnx-int8`` (distill/compress/qat.py)."""

    epochs: int = spec(2, ge=1)
    lr: float = spec(1e-4, gt=0, lt=1)
    alpha: float = spec(0.5, help="weight of the KD term (1 - alpha on the labels)", ge=0, le=1)
    temperature: float = spec(2.0, gt=0)
    teacher: Literal["self", "teacher"] = spec(
        "self", help="soft labels from the student's own fp32 self, or from the run's teacher")


@dataclass
class QuantizeConfig:
    """Quantized variants of every trained student: bitsandbytes (int8, nf4, fp4: Linear
    layers, for GPU serving and big models) and ONNX with onnxruntime (onnx: the fp32
    graph; onnx-int8: static int8 with convolutions; onnx-int4: 4-bit weight-only MatMul)."""

    formats: list[Literal["int8", "nf4", "fp4", "onnx", "onnx-int8", "onnx-int4",
                          "onnx-int8-qat"]] = spec(default_factory=lambda: ["int8", "nf4"])
    double_quant: bool = spec(False)
    calibration_records: int = spec(256, help="training records that calibrate onnx-int8's "
                                              "activation ranges", ge=1, since="0.2")
    kd_qat: KDQATConfig = spec(default_factory=lambda: KDQATConfig(), since="0.2")


@dataclass
class ExportConfig:
    enabled: bool = spec(True)
    license: str = spec("cc-by-4.0")
    publish_repo: str | None = spec(None, help="org/name the model cards' usage snippet loads "
                                               "(publishing itself is `ecg-distill publish`)")


@dataclass
class SweepConfig:
    """Runs of the whole recipe over seeds and label fractions (``ecg-distill run``'s
    ``--seeds`` / ``--label-fractions`` override it); empty = one run."""

    seeds: list[int] = spec(default_factory=list, help="one run per seed (its own folder)",
                            ge=0)
    label_fractions: list[float] = spec(default_factory=list,
                                        help="one run per label fraction (data.label_fraction)",
                                        gt=0, le=1)


@dataclass
class MaskConfig:
    """Which (lead, patch) tokens masked pretraining hides (distill/models/masked.py)."""

    ratio: float = spec(0.75, help="share of the tokens hidden", ge=0, lt=1)
    strategy: Literal["patches", "time", "channels", "time_channel"] | None = spec(
        None, help="random patches, blocks of time (every lead), whole channels (leads), or "
                   "time and channel together; null = the family's own (csfm: time_channel, "
                   "lamae: patches)")
    block: int = spec(2, help="patches per time block", ge=1, le=1000)


@dataclass
class PretrainDataConfig:
    """Records pretraining reads besides the data section's training folds (labels never
    read): a folder in data.format's layout and/or synthetic records of other patients."""

    path: str | None = spec(None, help="a PTB-XL- or CinC-layout folder of extra records")
    synthetic: int = spec(0, help="extra synthetic records generated for pretraining",
                          ge=0, le=1_000_000)
    seed: int = spec(1, help="seed of the extra synthetic records", ge=0)
    first_patient_id: int | None = spec(
        None, help="lowest patient id of the extra synthetic records; null = just above the "
                   "data set's", ge=1)


@dataclass
class PretrainConfig:
    """Self-supervised pretraining of a foundation-model family (``ecg-distill pretrain``;
    ``mask`` applies to the masked families, ``tokenizer`` to hypnos): the data section's training folds (labels ignored) plus ``extra``, the
    validation fold for the reconstruction error that picks the best epoch."""

    family: str = spec("lamae", help="what to pretrain: csfm or lamae (masked modelling), rvq "
                                     "(the RVQ tokenizer) or hypnos (next-token prediction "
                                     "over a tokenizer's codes)")
    size: str = spec("tiny", help="size preset")
    options: dict[str, Any] = spec(default_factory=dict,
                                   help="preset dials or config fields, e.g. {cross_lead: false}")
    mask: MaskConfig = spec(default_factory=MaskConfig)
    tokenizer: str | None = spec(None, help="hypnos: the trained RVQ tokenizer's folder "
                                            "(an rvq pretraining's RUN/pretrain/best)")
    extra: PretrainDataConfig = spec(default_factory=PretrainDataConfig)
    epochs: int | None = spec(None, help="null = train.epochs", ge=1)
    lr: float | None = spec(None, help="null = train.lr", gt=0, lt=1)
    batch_size: int | None = spec(None, help="null = train.batch_size", ge=1)

    def validate(self, path: str) -> None:
        _check_choice(f"{path}.family", self.family, pretraining_families())
        _check_choice(f"{path}.size", self.size, pretraining_sizes(self.family))
        if (self.family == "hypnos") != (self.tokenizer is not None):
            raise RecipeError(f"{path}.tokenizer: " + (
                "hypnos models a trained tokenizer's codes; name its folder (an rvq "
                "pretraining's RUN/pretrain/best)" if self.family == "hypnos" else
                f"only hypnos reads a tokenizer, not {self.family}"))
        why = {"mask_ratio": f"set it with {path}.mask.ratio",
               "mask_strategy": f"set it with {path}.mask.strategy",
               "mask_block": f"set it with {path}.mask.block",
               "sampling_rate": "the data's rate (data.sampling_rate) is used",
               "input_samples": "the data's record length is used",
               "leads": "pretraining reads all 12 leads; the pretrained model reads any subset "
                        "later with the same weights",
               "num_labels": "pretraining reads no labels",
               "rvq": f"hypnos takes its tokenizer's settings from {path}.tokenizer"}
        for key in self.options:
            if key in why:
                raise RecipeError(f"{path}.options.{key}: not a pretraining option; {why[key]}")
        try:
            check_pretraining_options(self.family, self.options)
        except ValueError as exc:
            raise RecipeError(f"{path}.options: {exc}") from None
        if self.extra.path is not None and self.extra.synthetic:
            raise RecipeError(f"{path}.extra.path and {path}.extra.synthetic: give one source "
                              f"of extra records")


@dataclass
class Recipe:
    """A whole run. ``output_dir`` may use ``{name}``."""

    name: str = spec("run", help="run name")
    output_dir: str = spec("runs/{name}", help="the run folder")
    seed: int = spec(0, ge=0)
    data: DataConfig = spec(default_factory=DataConfig)
    teacher: TeacherConfig = spec(default_factory=TeacherConfig)
    students: list[StudentConfig] = spec(default_factory=lambda: [StudentConfig()])
    distill: DistillConfig = spec(default_factory=DistillConfig)
    train: TrainConfig = spec(default_factory=TrainConfig)
    evaluate: EvaluateConfig = spec(default_factory=EvaluateConfig)
    ablations: AblationConfig = spec(default_factory=AblationConfig)
    quantize: QuantizeConfig = spec(default_factory=QuantizeConfig)
    export: ExportConfig = spec(default_factory=ExportConfig)
    sweep: SweepConfig = spec(default_factory=SweepConfig, since="0.2")
    pretrain: PretrainConfig = spec(default_factory=PretrainConfig, since="0.2")
    translate: TranslateConfig = spec(default_factory=TranslateConfig, since="0.3")

    def validate(self, path: str) -> None:
        at = f"{path}." if path else ""
        if self.ablations.runs and self.ablations.student >= len(self.students):
            raise RecipeError(f"{at}ablations.student: {self.ablations.student}, but the "
                              f"recipe has {len(self.students)} student(s)")
        for i, name in enumerate(self.ablations.runs):
            weights = AblationConfig.weights(name, self.distill.weights)
            if not any(v > 0 for v in weights.values()):
                raise RecipeError(f"{at}ablations.runs.{i}: {name} leaves no distillation term "
                                  f"weighted (it would train the label-only baseline again)")
            if name.startswith("with_") and self.distill.weights.get(name[5:], 0.0) > 0:
                raise RecipeError(f"{at}ablations.runs.{i}: {name}, but distill.weights."
                                  f"{name[5:]} is already on (it would train the full recipe "
                                  f"again; use no_{name[5:]})")
            if name.startswith("with_") and weights == dict(self.distill.weights):
                raise RecipeError(f"{at}ablations.runs.{i}: {name} changes nothing: "
                                  f"{name[5:]} needs one of the terms the recipe leaves off "
                                  f"(it would train the full recipe again)")
        t = self.distill.transfer
        if t.path is not None and self.data.path is not None and \
                Path(t.path).expanduser().resolve() == Path(self.data.path).expanduser().resolve():
            raise RecipeError(f"{at}distill.transfer.path: {t.path} is data.path itself; its "
                              f"validation and test records would reach distillation (give a "
                              f"folder of other records)")
        if t.synthetic and t.first_patient_id is not None and self.data.path is None:
            lo, hi = patient_id_range(self.data.synthetic.records,
                                      self.data.synthetic.first_patient_id)
            t_lo, t_hi = patient_id_range(t.synthetic, t.first_patient_id)
            if t_lo <= hi and lo <= t_hi:
                raise RecipeError(f"{at}distill.transfer.first_patient_id: patient ids "
                                  f"{t_lo}-{t_hi} overlap the labeled set's {lo}-{hi}; the "
                                  f"transfer records must come from other patients")
        self._check_image_students(at)
        names = [f"{s.family}/{s.size}" for s in self.students]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise RecipeError(f"{at}students: {dup} is listed twice (each family/size once)")
        try:
            self.output_dir.format(name=self.name)
        except (KeyError, IndexError, ValueError) as exc:
            raise RecipeError(f"output_dir: {self.output_dir!r} may only use "
                              f"{{name}} ({type(exc).__name__}: {exc})") from None

    def _check_image_students(self, at: str) -> None:
        """Students reading the printout: a square one, no signal view of their own, no
        signal augmentation (they read the cached clean printouts; ``augment.printout``
        perturbs those). (A VLM student's ONNX formats are skipped at the quantize stage,
        saying why: the recipe's other students may have them.)"""
        img, a = self.data.image, self.train.augment
        for i, st in enumerate(self.students):
            if not students.reads_images(st.family):
                continue
            where = f"{at}students.{i}"
            if img.height != img.width:
                raise RecipeError(f"{where}.family: {st.family} reads square printouts; "
                                  f"data.image is {img.height}x{img.width}")
            if st.view.leads is not None or st.view.sampling_rate is not None:
                raise RecipeError(f"{where}.view: {st.family} reads the printout of every "
                                  f"record as the data stage draws it (all 12 leads at "
                                  f"data.sampling_rate); leave its view unset")
            if a.noise or a.amplitude or a.shift or a.views:
                raise RecipeError(f"{at}train.augment: signal augmentation (noise, amplitude, "
                                  f"shift, views) does not reach {st.family}, which reads the "
                                  f"cached printouts; use train.augment.printout")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with the ``distill`` section as :meth:`DistillConfig.hash_dict`
        gives it (what stage hashes and job fingerprints read)."""
        out = to_hash_dict(self)
        out["distill"] = self.distill.hash_dict()
        return out


def _check_leads(leads: Sequence[str] | None, path: str) -> None:
    if leads is None:
        return
    try:
        lead_indices(leads)
    except DataError as exc:
        raise RecipeError(f"{path}: {exc}") from None
