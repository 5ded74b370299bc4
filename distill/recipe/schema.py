"""Typed recipes: YAML plus ``key.sub=value`` overrides, validated strictly before any work.

A recipe says everything a run does: the data, the teacher, the students, the distillation
objective, training, quantization and export. ``load_recipe`` reads the YAML, applies the
command-line overrides, and builds the dataclasses below; an unknown key, a wrong type or an
out-of-range value stops it with one line naming the key path::

    unknown key 'data.samplng_rate'; did you mean 'data.sampling_rate'?

Sections that later stages consume are declared here in full so that a recipe is checked
as a whole, before hours of training begin.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from distill.core.schema import build, field_names, spec, to_dict, unknown_key
from distill.core.leads import lead_indices
from distill.core.errors import DataError, RecipeError
from distill.core.io import atomic_write_text

Task = Literal["all", "diagnostic", "subdiagnostic", "superdiagnostic", "form", "rhythm"]


@dataclass
class SyntheticConfig:
    """The embedded default: a synthetic data set in the PTB-XL layout, generated on first use."""

    records: int = spec(2000, help="number of records to generate", ge=20, le=1_000_000)
    seed: int = spec(0, help="generator seed (same seed, same files)", ge=0)
    first_patient_id: int = spec(1, help="lowest patient id: sets whose id ranges do not "
                                 "overlap share no patient", ge=1)
    rates: list[int] = spec(default_factory=lambda: [100, 500],
                            help="sampling rates written (PTB-XL stores 100 and 500 Hz)")

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

    def validate(self, path: str) -> None:
        _check_leads(self.leads, f"{path}.leads")


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
    task: Task = spec("superdiagnostic", help="PTB-XL benchmark task")
    sampling_rate: int = spec(100, help="Hz of the signals served (PTB-XL: 100 or 500 stored)",
                              ge=10, le=2000)
    leads: list[str] | None = spec(None, help="lead subset served by default; null = all 12")
    folds: FoldsConfig = spec(default_factory=FoldsConfig)
    min_samples: int = spec(0, help="drop classes with at most this many records", ge=0)
    scaler: Literal["global", "per_lead", "none"] = spec(
        "global", help="standard scaler fitted on the training folds only")
    on_bad_record: Literal["error", "skip"] = spec(
        "error", help="a missing, corrupt, NaN or flat record: stop, or skip it with a warning")
    cache_dir: str | None = spec(None, help="decoded-signal/image cache; null = $ECG_DISTILL_CACHE "
                                            "or ~/.cache/ecg-distill")
    image: ImageConfig = spec(default_factory=ImageConfig)

    def validate(self, path: str) -> None:
        _check_leads(self.leads, f"{path}.leads")
        stored = self.synthetic.rates
        needed = 100 if self.sampling_rate <= 100 else 500  # the folder it is read from
        if self.path is None and self.format == "ptbxl" and needed not in stored:
            raise RecipeError(f"{path}.sampling_rate: {self.sampling_rate} Hz is read from "
                              f"{needed} Hz records, not among the synthetic set's rates "
                              f"{stored} ({path}.synthetic.rates)")


@dataclass
class TeacherConfig:
    """The large model distilled from (adapters come with the models stage)."""

    kind: Literal["vlm", "signal"] = spec("vlm", help="image-text VLM or speech-style signal encoder")
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


@dataclass
class StudentConfig:
    """One compact student: a family and a size preset."""

    family: Literal["xresnet1d", "leadformer"] = spec("xresnet1d", help="student architecture")
    size: Literal["tiny", "small", "base"] = spec("tiny", help="size preset")
    view: ViewConfig = spec(default_factory=ViewConfig)
    epochs: int | None = spec(None, help="this student's epochs (null = train.epochs)", ge=1)
    lr: float | None = spec(None, help="this student's learning rate (null = train.lr); "
                                       "transformers from scratch want less than CNNs",
                            gt=0, lt=1)


@dataclass
class LossWeights:
    """Weights λ of the distillation terms; a term of weight 0 is not computed."""

    kd: float = spec(1.0, ge=0)
    mhca: float = spec(1.0, ge=0)
    ot: float = spec(1.0, ge=0)
    relation: float = spec(1.0, ge=0)


@dataclass
class DistillConfig:
    """L = (1 - alpha) * L_task + alpha * sum_i lambda_i * L_i (EVL-ECG)."""

    alpha: float = spec(0.5, help="share of the distillation terms", ge=0, le=1)
    weights: LossWeights = spec(default_factory=LossWeights)
    temperature: float = spec(2.0, help="KD temperature", gt=0)
    ot_reg: float = spec(0.05, help="entropic regularisation of the OT loss", gt=0)
    ot_iters: int = spec(50, help="Sinkhorn iterations", ge=1)
    lead_prior: float = spec(0.0, help="OT cost added where token leads differ", ge=0)
    mhca_heads: int = spec(4, help="heads of the cross-attention alignment", ge=1)
    align_dim: int = spec(128, help="common width of the projected features (mhca, ot)", ge=1)
    relation_criterion: Literal["smooth_l1", "mse"] = spec("smooth_l1")
    batch_rkd: bool = spec(False, help="also match batch-level RKD distances/angles of pooled")

    def validate(self, path: str) -> None:
        w = self.weights
        if w.relation > 0 and w.mhca == 0 and w.ot == 0:
            raise RecipeError(f"{path}.weights.relation: relation matching compares the student "
                              f"with the teacher tokens aligned to it; give {path}.weights.mhca "
                              f"or {path}.weights.ot a weight > 0, or set it to 0")
        if self.align_dim % self.mhca_heads:
            raise RecipeError(f"{path}.align_dim: {self.align_dim} is not a multiple of "
                              f"{path}.mhca_heads={self.mhca_heads}")


@dataclass
class AugmentConfig:
    """Signal augmentation before every view is cut (all 0 = off; when on, distillation
    runs the teacher live, since its input changes every epoch)."""

    noise: float = spec(0.0, help="std of added Gaussian noise, mV", ge=0)
    amplitude: float = spec(0.0, help="amplitude jitter: scale drawn from [1-a, 1+a]", ge=0, lt=1)
    shift: float = spec(0.0, help="largest circular time shift, seconds", ge=0)


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


ABLATIONS = ("no_mhca", "no_ot", "no_relation", "kd_only")


@dataclass
class AblationConfig:
    """Distillation with terms removed, for one student (the report's ablation table)."""

    runs: list[Literal["no_mhca", "no_ot", "no_relation", "kd_only"]] = spec(
        default_factory=list, help="which ablations to train (empty = none)")
    student: int = spec(0, help="index into students of the ablated student", ge=0)


@dataclass
class QuantizeConfig:
    formats: list[Literal["int8", "nf4", "fp4"]] = spec(default_factory=lambda: ["int8", "nf4"])
    double_quant: bool = spec(False)


@dataclass
class ExportConfig:
    enabled: bool = spec(True)
    license: str = spec("cc-by-4.0")
    publish_repo: str | None = spec(None, help="org/name the model cards' usage snippet loads "
                                               "(publishing itself is `ecg-distill publish`)")


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

    def validate(self, path: str) -> None:
        at = f"{path}." if path else ""
        if self.ablations.runs and self.ablations.student >= len(self.students):
            raise RecipeError(f"{at}ablations.student: {self.ablations.student}, but the "
                              f"recipe has {len(self.students)} student(s)")
        names = [f"{s.family}/{s.size}" for s in self.students]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise RecipeError(f"{at}students: {dup} is listed twice (each family/size once)")
        try:
            self.output_dir.format(name=self.name)
        except (KeyError, IndexError, ValueError) as exc:
            raise RecipeError(f"output_dir: {self.output_dir!r} may only use "
                              f"{{name}} ({type(exc).__name__}: {exc})") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_leads(leads: Sequence[str] | None, path: str) -> None:
    if leads is None:
        return
    try:
        lead_indices(leads)
    except DataError as exc:
        raise RecipeError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _schema_at(cls: Any, parts: list[str], full: str) -> None:
    """Check an override's key path against the schema, so a typo names the closest key."""
    import typing

    tp: Any = cls
    walked: list[str] = []
    for part in parts:
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            if not part.isdigit():
                raise RecipeError(f"override '{full}': '{'.'.join(walked)}' is a list; use an index")
            tp = typing.get_args(tp)[0]
        elif dataclasses.is_dataclass(tp):
            names = field_names(tp)
            if part not in names:
                raise unknown_key(".".join(walked), part, names)
            tp = typing.get_type_hints(tp)[part]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if typing.get_origin(tp) is not list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
                tp = args[0]
        else:
            raise RecipeError(f"override '{full}': '{'.'.join(walked)}' has no sub-keys")
        walked.append(part)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each ``key.path=value`` in the raw recipe dict (lists indexed by number)."""
    for text in overrides:
        parts, value = parse_override(text)
        _schema_at(Recipe, parts, text.partition("=")[0])
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                idx = int(part)
                if idx >= len(node):
                    raise RecipeError(f"override '{text}': index {idx} out of range "
                                      f"({'.'.join(parts[:i])} has {len(node)})")
                node = node[idx]
                continue
            if node.get(part) is None:
                node[part] = [] if parts[i + 1].isdigit() else {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last)
            if idx >= len(node):
                raise RecipeError(f"override '{text}': index {idx} out of range")
            node[idx] = value
        else:
            node[last] = value
    return data


# ---------------------------------------------------------------- loading


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping in a recipe file, with a one-line error for a bad file."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{p}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"{p}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return dict(data)


def recipe_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Build a validated Recipe from a mapping plus overrides."""
    raw = _merge(to_dict(Recipe()), data)
    return build(Recipe, apply_overrides(raw, overrides))


def _merge(base: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` laid over the defaults: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; the name defaults to the file's stem."""
    data = read_yaml(path)
    data.setdefault("name", Path(path).stem)
    try:
        return recipe_from_dict(data, overrides)
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None


def write_resolved(recipe: Recipe, run_dir: str | os.PathLike | None = None) -> Path:
    """Write the resolved recipe (every default filled in) as ``recipe.yaml`` in the run folder."""
    folder = Path(run_dir) if run_dir is not None else recipe.run_dir
    return atomic_write_text(folder / "recipe.yaml", recipe.to_yaml())
