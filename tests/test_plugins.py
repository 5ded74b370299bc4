"""A new loss family, or a new student family, is one new module: its file registers
itself, and the recipe, the objective, the ablations and the model factory take it up with
no edit anywhere else (docs/architecture.md, "Losses" and "Models")."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import distill.losses
import students
from students import _registry
from distill.core.contract import ECGModelOutput
from distill.core.errors import RecipeError
from distill.engine.factory import build_objective, build_student
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
    assert only == {"kd": 0.0, "mhca": 0.0, "ot": 0.0, "codes": 0.0, "toy": 0.5,
                    "relation": 0.0}


def test_without_the_module_the_name_is_unknown() -> None:
    with pytest.raises(RecipeError, match=r"unknown key 'distill\.weights\.toy'"):
        recipe_from_dict({"distill": {"weights": {"toy": 1.0}}})
    with pytest.raises(RecipeError, match=r"ablations\.runs\.0: 'no_toy' is not one of"):
        recipe_from_dict({"ablations": {"runs": ["no_toy"]}})


STUDENT = textwrap.dedent('''
    """A toy student family: per-lead means of the signal, a linear classifier."""
    from torch import nn

    from students._common import ECGStudentConfig, ECGStudentModel
    from students._registry import register_family, register_preset


    class ToyStudentConfig(ECGStudentConfig):
        model_type = "ecg_toy_student"


    class ToyStudentModel(ECGStudentModel):
        config_class = ToyStudentConfig
        family = "toystudent"

        def __init__(self, config):
            super().__init__(config)
            self.classifier = nn.Linear(len(config.leads), config.num_labels)
            self.post_init()

        def forward_features(self, signal):
            tokens = signal.mean(dim=-1, keepdim=True)  # (B, L, 1): one token per lead
            return tokens, torch.tensor(list(self.config.lead_ids))

        def forward_head(self, tokens, pre_logits=False):
            pooled = tokens[..., 0]
            return pooled if pre_logits else self.classifier(pooled)


    import torch

    register_family("toystudent", ToyStudentConfig, dials=(), model_class=ToyStudentModel)


    @register_preset("toystudent", "tiny")
    def tiny(**config):
        return ToyStudentModel(ToyStudentConfig(**config))
''')


@pytest.fixture
def toy_student_family(tmp_path, monkeypatch):
    """The toy student module on the students package's path; removed again afterwards."""
    (tmp_path / "toystudent.py").write_text(STUDENT)
    monkeypatch.setattr(students, "__path__", [*students.__path__, str(tmp_path)])
    students.discover()
    yield
    _registry._PRESETS.pop(("toystudent", "tiny"), None)
    _registry._OPTIONS.pop("toystudent", None)
    sys.modules.pop("students.toystudent", None)


def test_a_new_student_module_is_a_family_the_recipe_accepts(toy_student_family) -> None:
    recipe = recipe_from_dict({"students": [{"family": "toystudent", "size": "tiny",
                                             "view": {"leads": ["I", "II"]}}]})
    model = build_student(recipe, recipe.students[0], ["A", "B", "C"])
    out = model(signal=torch.ones(2, 2, 1000))
    assert out.logits.shape == (2, 3) and out.tokens.shape == (2, 2, 1)
    assert out.token_leads.tolist() == [0, 1]
    with pytest.raises(RecipeError, match=r"students\.0\.family: 'toystudnt' is not one of "
                                          r".*did you mean 'toystudent'\?"):
        recipe_from_dict({"students": [{"family": "toystudnt", "size": "tiny"}]})
