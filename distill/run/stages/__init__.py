"""The stages of ``ecg-distill run``, one module each, in the order they run."""

from distill.run.stage import Stage
from distill.run.stages import data, evaluate, export, quantize, report, teacher, train

STAGES: tuple[Stage, ...] = (
    data.STAGE,
    teacher.TEACHER_STAGE,
    teacher.CACHE_STAGE,
    train.BASELINE_STAGE,
    train.DISTILL_STAGE,
    train.ABLATION_STAGE,
    evaluate.STAGE,
    quantize.STAGE,
    report.STAGE,
    export.STAGE,
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

__all__ = ["STAGES", "STAGE_NAMES"]
