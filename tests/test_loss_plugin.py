"""A new loss family is one new module: its file registers the loss and its config
dataclass, and the recipe, the objective and the ablations take it up with no edit
anywhere else (docs/architecture.md, "Adding a loss")."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import distill.losses
from distill.core.contract import ECGModelOutput
from distill.core.errors import RecipeError
from distill.engine.factory import build_objective
from distill.engine.jobs import ablation_recipe
from distill.recipe import recipe_from_dict

TOY = textwrap.dedent('''
    """A toy loss family: the mean squared pooled embedding of the student, scaled."""
    from dataclasses import dataclass

    from distill.core.schema import spec
    from distill.losses import LossOutput, register_loss
    from torch import nn


    @dataclass
    class ToyConfig:
        """Configuration of the toy term."""

        scale: float = spec(1.0, help="factor on the mean squared embedding", gt=0)


    @register_loss("toy", config=ToyConfig, default_weight=0.0, order=40)
    class ToyLoss(nn.Module):
        def __init__(self, *, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale

        def forward(self, student_out, teacher_out, batch=None, context=None):
            return LossOutput(self.scale * student_out.pooled.pow(2).mean(), {})
''')


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    """The toy module, in a folder on the loss package's path (as a new file in
    distill/losses/ would be); removed again afterwards."""
    (tmp_path / "toy_family.py").write_text(TOY)
    monkeypatch.setattr(distill.losses, "__path__", [*distill.losses.__path__, str(tmp_path)])
    yield
    distill.losses.LOSSES.unregister("toy")
    sys.modules.pop("distill.losses.toy_family", None)


def _outputs(batch: int = 3) -> tuple[ECGModelOutput, ECGModelOutput]:
    g = torch.Generator().manual_seed(0)

    def out(d: int) -> ECGModelOutput:
        return ECGModelOutput(logits=torch.randn(batch, 5, generator=g, requires_grad=True),
                              tokens=torch.randn(batch, 4, d, generator=g),
                              token_leads=torch.arange(4),
                              pooled=torch.randn(batch, d, generator=g, requires_grad=True))

    return out(8), out(16)


def test_a_new_loss_module_is_a_recipe_section_a_weight_and_an_ablation(toy_family) -> None:
    recipe = recipe_from_dict({"distill": {"weights": {"toy": 0.5}, "toy": {"scale": 3.0}}})
    assert recipe.distill.weights["toy"] == 0.5
    assert recipe.distill.losses["toy"].scale == 3.0
    # written back into recipe.yaml as a section of its own, and read back the same
    assert recipe.to_dict()["distill"]["toy"] == {"scale": 3.0}
    assert recipe_from_dict(recipe.to_dict()) == recipe
    # validated like every other key, with its own range and a typo hint
    with pytest.raises(RecipeError, match=r"^distill\.toy\.scale: must be > 0"):
        recipe_from_dict({}, ["distill.toy.scale=0"])
    with pytest.raises(RecipeError, match=r"did you mean 'distill\.toy\.scale'"):
        recipe_from_dict({}, ["distill.toy.scal=2"])
    # the objective builds and runs it, in its registered order (after ot, before relation)
    objective = build_objective(recipe, 8, 16)
    assert list(objective.losses) == ["kd", "mhca", "ot", "toy", "relation"]
    student, teacher = _outputs()
    out = objective(student, teacher, {"labels": torch.zeros(3, 5)})
    expected_toy = 3.0 * student.pooled.detach().pow(2).mean()
    torch.testing.assert_close(out.terms["toy"], expected_toy)
    d = recipe.distill
    total = (1 - d.alpha) * out.terms["task"] + d.alpha * sum(
        d.weights[k] * out.terms[k] for k in ("kd", "mhca", "ot", "toy", "relation"))
    torch.testing.assert_close(out.total.detach(), total)
    out.total.backward()
    assert student.pooled.grad is not None
    # an ablation is a weight override: no_toy and toy_only exist without being declared
    ablated = recipe_from_dict({"distill": {"weights": {"toy": 0.5}},
                                "ablations": {"runs": ["no_toy", "toy_only"]}})
    assert ablation_recipe(ablated, "no_toy").distill.weights["toy"] == 0.0
    only = ablation_recipe(ablated, "toy_only").distill.weights
    assert only == {"kd": 0.0, "mhca": 0.0, "ot": 0.0, "toy": 0.5, "relation": 0.0}


def test_without_the_module_the_name_is_unknown() -> None:
    with pytest.raises(RecipeError, match=r"unknown key 'distill\.weights\.toy'"):
        recipe_from_dict({"distill": {"weights": {"toy": 1.0}}})
    with pytest.raises(RecipeError, match=r"ablations\.runs\.0: 'no_toy' is not one of"):
        recipe_from_dict({"ablations": {"runs": ["no_toy"]}})
