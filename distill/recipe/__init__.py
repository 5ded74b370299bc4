from distill.recipe.schema import *  # noqa: F401,F403  (temporary during the move)
from distill.recipe.schema import (Recipe, load_recipe, recipe_from_dict, read_yaml,  # noqa: F401
                                   write_resolved, apply_overrides, parse_override)
