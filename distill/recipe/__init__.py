"""Recipes: the schema (:mod:`distill.recipe.schema`) and loading (:mod:`distill.recipe.load`)."""

from distill.recipe.load import (
    apply_overrides,
    load_recipe,
    parse_override,
    read_yaml,
    recipe_from_dict,
    write_resolved,
)
from distill.recipe.schema import (
    AblationConfig,
    AugmentConfig,
    DataConfig,
    DistillConfig,
    EvaluateConfig,
    ExportConfig,
    FoldsConfig,
    ImageConfig,
    QuantizeConfig,
    Recipe,
    StudentConfig,
    SweepConfig,
    SyntheticConfig,
    TeacherConfig,
    TrainConfig,
    ViewConfig,
    default_weights,
)

__all__ = ["AblationConfig", "AugmentConfig", "DataConfig", "DistillConfig", "EvaluateConfig",
           "ExportConfig", "FoldsConfig", "ImageConfig", "QuantizeConfig", "Recipe",
           "StudentConfig", "SweepConfig", "SyntheticConfig", "TeacherConfig", "TrainConfig", "ViewConfig",
           "apply_overrides", "default_weights", "load_recipe", "parse_override", "read_yaml",
           "recipe_from_dict", "write_resolved"]
