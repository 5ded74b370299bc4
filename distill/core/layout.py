"""Every path of a run folder, and every model's identity: :class:`RunLayout`, :class:`ModelId`.

A run folder (``output_dir`` of a recipe)::

    recipe.yaml                       the resolved recipe (an earlier, different one: recipe.N.yaml)
    stages/<stage>.json               a finished stage's marker (summary, recipe hash)
    teacher/                          the teacher's training job (best/, checkpoints/, metrics.json, log.csv)
    baseline/<family>-<size>/         a student trained on the labels alone
    distill/<family>-<size>/          a student trained with the distillation objective
    ablation/<name>-<family>-<size>/  an ablation of one student's distillation
    eval/<model>/predictions.npz      each model's validation and test predictions
    results.json                      the evaluation (the report's single source)
    quantized/<kind>-<family>-<size>-<format>/   a quantized student (a loadable folder)
    quantized/eval/<model>/predictions.npz
    quantized.json                    the quantize stage's results
    report.md, figures/               the report
    export/<model>/                   hub-ready folders

Models are named in ``results.json``, logs and messages by :attr:`ModelId.name`
("teacher", "distill xresnet1d/tiny", "ablation no_ot xresnet1d/tiny",
"distill leadformer/tiny nf4"); :meth:`ModelId.parse` reads such a name back. Nothing else
builds or splits these strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from distill.core.errors import ECGDistillError

TEACHER = "teacher"
TRAINED_KINDS = ("baseline", "distill", "ablation")  # students trained by the run
KINDS = (TEACHER, *TRAINED_KINDS)


class ModelNameError(ECGDistillError, ValueError):
    """A string that is not the name of a model of a run."""


@dataclass(frozen=True)
class ModelId:
    """One model of a run.

    Attributes:
        kind: "teacher", "baseline", "distill" or "ablation".
        family, size: the student preset (None for the teacher).
        variant: the ablation's name (kind "ablation"), or the quantization format of a
            baseline or distilled student's quantized variant ("int8", "nf4", "fp4").
    """

    kind: str
    family: str | None = None
    size: str | None = None
    variant: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if (self.kind == TEACHER) != (self.family is None):
            raise ValueError(f"model {self.kind}: a student needs a family and size, the "
                             f"teacher has none")
        if self.kind == "ablation" and not self.variant:
            raise ValueError("an ablation model needs its ablation's name (variant)")

    # ------------------------------------------------------------ constructors
    @classmethod
    def teacher(cls) -> ModelId:
        return cls(TEACHER)

    @classmethod
    def student(cls, kind: str, spec, variant: str | None = None) -> ModelId:
        """The ``kind`` model of a student spec (anything with ``family`` and ``size``)."""
        return cls(kind, spec.family, spec.size, variant)

    @classmethod
    def parse(cls, name: str) -> ModelId:
        """The inverse of :attr:`name`."""
        parts = name.split()
        try:
            if parts == [TEACHER]:
                return cls.teacher()
            if parts[0] == "ablation" and len(parts) == 3:
                family, size = _split_student(parts[2])
                return cls("ablation", family, size, parts[1])
            if parts[0] in ("baseline", "distill") and len(parts) in (2, 3):
                family, size = _split_student(parts[1])
                return cls(parts[0], family, size, parts[2] if len(parts) == 3 else None)
        except (IndexError, ValueError):
            pass
        raise ModelNameError(f"{name!r} is not a model name of a run (e.g. 'teacher', "
                         f"'distill xresnet1d/tiny', 'ablation no_ot xresnet1d/tiny', "
                         f"'distill leadformer/tiny nf4')")

    # ------------------------------------------------------------ views
    @property
    def quantized(self) -> bool:
        return self.kind in ("baseline", "distill") and self.variant is not None

    @property
    def result_kind(self) -> str:
        """The ``kind`` field of its results entry: "quantized" for a quantized variant."""
        return "quantized" if self.quantized else self.kind

    @property
    def student_name(self) -> str | None:
        """"family/size", or None for the teacher."""
        return None if self.family is None else f"{self.family}/{self.size}"

    @property
    def fp32(self) -> ModelId:
        """The model a quantized variant was made from (itself otherwise)."""
        return ModelId(self.kind, self.family, self.size) if self.quantized else self

    def as_kind(self, kind: str) -> ModelId:
        """The same student under another kind (no variant): its baseline, its distillation."""
        return ModelId(kind, self.family, self.size)

    @property
    def name(self) -> str:
        if self.kind == TEACHER:
            return TEACHER
        if self.kind == "ablation":
            return f"ablation {self.variant} {self.student_name}"
        base = f"{self.kind} {self.student_name}"
        return f"{base} {self.variant}" if self.variant else base

    @property
    def folder_name(self) -> str:
        """Its folder under ``eval/`` and ``export/``: "distill leadformer/tiny nf4" ->
        "distill_leadformer-tiny_nf4"."""
        return self.name.replace(" ", "_").replace("/", "-")

    @property
    def job_folder(self) -> str:
        """Where it is trained or written, relative to the run folder."""
        if self.kind == TEACHER:
            return TEACHER
        preset = f"{self.family}-{self.size}"
        if self.kind == "ablation":
            return f"ablation/{self.variant}-{preset}"
        if self.quantized:
            return f"{QUANTIZED_DIR}/{self.kind}-{preset}-{self.variant}"
        return f"{self.kind}/{preset}"

    def __str__(self) -> str:
        return self.name


def _split_student(text: str) -> tuple[str, str]:
    family, sep, size = text.partition("/")
    if not sep or not family or not size:
        raise ValueError(text)
    return family, size


STAGES_DIR = "stages"
EVAL_DIR = "eval"
QUANTIZED_DIR = "quantized"
ONNX_FORMATS: tuple[str, ...] = ("onnx", "onnx-int8", "onnx-int4", "onnx-int8-qat")


def is_onnx_format(fmt: str | None) -> bool:
    """Whether a variant format is run by onnxruntime (a folder with ``model.onnx``)."""
    return fmt in ONNX_FORMATS
EXPORT_DIR = "export"
FIGURES_DIR = "figures"
RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "results.json"
QUANTIZED_FILE = "quantized.json"
REPORT_FILE = "report.md"
BEST_DIR = "best"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder (see the module docstring)."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    # ------------------------------------------------------------ files of the run
    @property
    def recipe_file(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def results_file(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def quantized_file(self) -> Path:
        return self.root / QUANTIZED_FILE

    @property
    def report_file(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def figures_dir(self) -> Path:
        return self.root / FIGURES_DIR

    @property
    def export_dir(self) -> Path:
        return self.root / EXPORT_DIR

    def marker(self, stage: str) -> Path:
        """A finished stage's marker."""
        return self.root / STAGES_DIR / f"{stage}.json"

    def path(self, name: str) -> Path:
        """An entry directly under the run folder (what ``--force`` deletes)."""
        return self.root / name

    # ------------------------------------------------------------ models
    def job_dir(self, model: ModelId) -> Path:
        """A trained model's job folder (checkpoints, logs, ``best/``), or a quantized
        variant's folder."""
        return self.root / model.job_folder

    def model_dir(self, model: ModelId) -> Path:
        """The folder a model loads from: its job's ``best/``, or a quantized variant's folder."""
        folder = self.job_dir(model)
        return folder if model.quantized else folder / BEST_DIR

    @property
    def teacher_best(self) -> Path:
        return self.model_dir(ModelId.teacher())

    def eval_dir(self, quantized: bool = False) -> Path:
        """Where predictions are kept: ``eval/``, or ``quantized/eval/`` for the quantize
        stage (its fp32 references included)."""
        return self.root / QUANTIZED_DIR / EVAL_DIR if quantized else self.root / EVAL_DIR

    def predictions(self, model: ModelId, quantized_stage: bool | None = None) -> Path:
        """A model's stored predictions (``predictions.npz``); quantized variants (and, with
        ``quantized_stage``, the fp32 references of the quantize stage) under
        ``quantized/eval/``."""
        q = model.quantized if quantized_stage is None else quantized_stage
        return self.eval_dir(q) / model.folder_name / "predictions.npz"

    def sweep_point(self, fraction: float, seed: int) -> Path:
        """The run folder of one point of a sweep (``distill.run.sweep``)."""
        return self.root / f"labels-{fraction:g}" / f"seed-{seed}"

    def export_folder(self, model: ModelId, root: str | os.PathLike | None = None) -> Path:
        return Path(root if root is not None else self.export_dir) / model.folder_name

    def trained(self, kind: str) -> list[Path]:
        """The job folders of every student trained as ``kind`` ("baseline", "distill")."""
        return sorted(p for p in (self.root / kind).glob("*") if p.is_dir())
