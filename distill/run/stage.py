"""What a stage of ``ecg-distill run`` is: :class:`Stage` (name, the recipe sections it
depends on, what it writes, how it runs) and the :class:`RunContext` every stage reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.core.layout import RunLayout
from distill.core.schema import to_dict
from distill.engine.jobs import (JobData, augment_draws, code_levels, distill_settings,
                                 load_job_data, student_settings, teacher_settings)
from distill.recipe import Recipe


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    progress: bool = True
    resume: bool = False
    force: tuple[str, ...] = ()
    _job_data: JobData | None = None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    def job_data(self) -> JobData:
        """The loaded data and images, shared by the stages of one process."""
        if self._job_data is None:
            self._job_data = load_job_data(self.recipe, progress=self.progress)
        return self._job_data


@dataclass(frozen=True)
class Stage:
    """One step of a run: ``run(ctx)`` returns a JSON-able summary stored in its marker."""

    name: str
    description: str
    depends_on: tuple[str, ...]  # recipe sections whose change makes the stage stale
    run: Callable[[RunContext], dict[str, Any]]
    folders: tuple[str, ...] = ()  # run-folder entries ``--force`` deletes first
    collective: bool = False  # every process takes part (training); else main first
    main_only: bool = False  # only the main process runs it (the others wait)
    settings: Callable[[Recipe], dict[str, Any]] | None = None  # more hashed settings
    ignores: tuple[str, ...] = ()  # dotted keys inside depends_on that do not concern it


# what only the students read: the teacher's stages ignore it
STUDENT_ONLY = ("data.label_fraction", "train.augment.printout")


def teacher_stage_settings(recipe: Recipe) -> dict[str, Any]:
    return teacher_settings(recipe)


def cache_stage_settings(recipe: Recipe) -> dict[str, Any]:
    """The teacher's settings and, with fixed augmented views, the students' augmentation
    (the cache holds the teacher's outputs on those views)."""
    out = teacher_settings(recipe)
    if code_levels(recipe):  # the code distributions the codes term reads are cached too
        out["codes"] = code_levels(recipe)
    if augment_draws(recipe):
        out["augment"] = {k: v for k, v in to_dict(recipe.train.augment, hashing=True).items()
                          if k != "printout"}  # image students' augmentation: not the cache's
    return out


def student_stage_settings(recipe: Recipe) -> dict[str, Any]:
    return student_settings(recipe)


def distill_stage_settings(recipe: Recipe) -> dict[str, Any]:
    """Everything a stage downstream of distillation depends on besides the data."""
    return {**teacher_settings(recipe), "students": student_settings(recipe)}


# the recipe sections every stage after training depends on
TRAINED = ("data", "teacher", "students", "distill", "ablations", "evaluate")
__all__ = ["STUDENT_ONLY", "TRAINED", "RunContext", "Stage", "cache_stage_settings",
           "distill_settings", "distill_stage_settings",
           "student_stage_settings", "teacher_stage_settings"]
