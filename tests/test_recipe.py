"""Recipes: typed sections, overrides, strict one-line errors, the resolved recipe."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.core.errors import RecipeError
from distill.recipe import AblationConfig, Recipe, load_recipe, recipe_from_dict, write_resolved

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted([*(REPO / "recipes").glob("*.yaml"),
                 *(REPO / "recipes" / "teacher-zoo").glob("*.yaml")])


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe_path: Path) -> None:
    recipe = load_recipe(recipe_path)
    assert isinstance(recipe, Recipe)
    assert recipe.name


def test_overrides_set_typed_values() -> None:
    r = recipe_from_dict({}, ["train.epochs=3", "data.sampling_rate=500", "train.lr=3e-4",
                              "data.leads=[I, avr]", "students.0.size=small",
                              "train.grad_clip=null", "data.folds.test=[10]"])
    assert r.train.epochs == 3 and isinstance(r.train.epochs, int)
    assert r.data.sampling_rate == 500
    assert r.train.lr == pytest.approx(3e-4) and isinstance(r.train.lr, float)
    assert r.data.leads == ["I", "avr"]
    assert r.students[0].size == "small"
    assert r.train.grad_clip is None


def test_override_replaces_a_whole_list() -> None:
    r = recipe_from_dict({}, ["students=[{family: leadformer, size: base}, {size: small}]"])
    assert [(s.family, s.size) for s in r.students] == [("leadformer", "base"), ("xresnet1d", "small")]


def test_file_values_merge_over_defaults() -> None:
    r = recipe_from_dict({"train": {"epochs": 7}, "data": {"image": {"height": 448, "width": 448}}})
    assert r.train.epochs == 7 and r.train.batch_size == 64  # untouched default kept
    assert (r.data.image.height, r.data.image.width, r.data.image.patch_size) == (448, 448, 16)


BAD = [
    # (recipe data, overrides, the exact one-line message)
    ({}, ["data.samplng_rate=500"],
     "unknown key 'data.samplng_rate'; did you mean 'data.sampling_rate'?"),
    ({"data": {"samplng_rate": 500}}, [],
     "unknown key 'data.samplng_rate'; did you mean 'data.sampling_rate'?"),
    ({"trian": {"epochs": 1}}, [], "unknown key 'trian'; did you mean 'train'?"),
    ({"data": {"synthetic": {"recrods": 5}}}, [],
     "unknown key 'data.synthetic.recrods'; did you mean 'data.synthetic.records'?"),
    ({}, ["train.epochs=0"], "train.epochs: must be >= 1, got 0"),
    ({}, ["train.epochs=three"], "train.epochs: expected int, got str 'three'"),
    ({}, ["train.epochs=2.5"], "train.epochs: expected int, got float 2.5"),
    ({}, ["train.lr=1.5"], "train.lr: must be < 1, got 1.5"),
    ({}, ["distill.alpha=-0.1"], "distill.alpha: must be >= 0, got -0.1"),
    ({}, ["data.task=superdiag"],
     "data.task: 'superdiag' is not one of 'all', 'diagnostic', 'subdiagnostic', "
     "'superdiagnostic', 'form', 'rhythm', 'snomed'; did you mean 'superdiagnostic'?"),
    ({"students": [{"family": "xresnet"}]}, [],
     "students.0.family: 'xresnet' is not one of 'convnext', 'csfm', 'lamae', 'leadformer', "
     "'llava', 'vit', 'xresnet1d'; did you mean 'xresnet1d'?"),
    ({}, ["data.leads=[I, X1]"],
     "data.leads: unknown lead name 'X1'; expected one of I, II, III, aVR, aVL, aVF, V1, V2, "
     "V3, V4, V5, V6"),
    ({}, ["teacher.view.leads=[I, i]"], "teacher.view.leads: duplicate lead in ['I', 'i']"),
    ({}, ["data.folds.val=[8]"], "data.folds.val: fold 8 is already in data.folds.train"),
    ({}, ["data.folds.test=[11]"], "data.folds.test.0: must be <= 10, got 11"),
    ({}, ["data.image.patch_size=15"],
     "data.image.height: 224 is not a multiple of data.image.patch_size=15"),
    ({}, ["data.synthetic=5"], "data.synthetic: expected mapping, got int 5"),
    ({}, ["train.mixed_precision=true"],
     "train.mixed_precision: True is not one of 'no', 'bf16', 'fp16'"),
    ({"train": [1, 2]}, [], "train: expected mapping, got list [1, 2]"),
    ({}, ["students.4.size=small"], "override 'students.4.size=small': index 4 out of range "
                                    "(students has 1)"),
    ({}, ["train.epochs"], "override 'train.epochs': expected key.path=value"),
    ({}, ["train.epochs.max=3"], "override 'train.epochs.max': 'train.epochs' has no sub-keys"),
    ({}, ["output_dir=runs/{foo}"],
     "output_dir: 'runs/{foo}' may only use {name} (KeyError: 'foo')"),
    ({}, ["data.foo=1"], "unknown key 'data.foo'; valid keys under 'data': path, format, "
     "synthetic, task, sampling_rate, leads, folds, min_samples, scaler, on_bad_record, "
     "on_flat_lead, cache_dir, image, label_fraction"),
]


@pytest.mark.parametrize(("data", "overrides", "message"), BAD,
                         ids=[m[:40] for _d, _o, m in BAD])
def test_bad_recipes_fail_with_one_line(data, overrides, message) -> None:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, overrides)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match=r"nope\.yaml: recipe file not found"):
        load_recipe(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("data:\n  task: [unclosed\n")
    with pytest.raises(RecipeError, match=r"broken\.yaml: line \d+ is not valid YAML"):
        load_recipe(broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  samplng_rate: 100\n")
    with pytest.raises(RecipeError, match=re.escape(
            f"{typo}: unknown key 'data.samplng_rate'; did you mean 'data.sampling_rate'?")):
        load_recipe(typo)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(RecipeError, match="a recipe must be a mapping of sections, got int"):
        load_recipe(scalar)


def test_resolved_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml",
                         ["train.epochs=2", f"output_dir={tmp_path}/{{name}}"])
    written = write_resolved(recipe)
    assert written == tmp_path / "quickstart" / "recipe.yaml"
    again = load_recipe(written)
    assert again == recipe
    # every default is spelled out, so the run folder says exactly what ran
    resolved = yaml.safe_load(written.read_text())
    assert resolved["train"]["batch_size"] == 64 and resolved["data"]["folds"]["val"] == [9]


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_validate_prints_resolved_recipe_or_one_line_error() -> None:
    ok = _cli("validate", "recipes/quickstart.yaml", "train.epochs=3")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["train"]["epochs"] == 3
    bad = _cli("validate", "recipes/quickstart.yaml", "data.samplng_rate=500")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert bad.stderr == ("error: recipes/quickstart.yaml: unknown key 'data.samplng_rate'; "
                          "did you mean 'data.sampling_rate'?\n")


@pytest.mark.parametrize("command", [[], ["validate"], ["run"], ["data"], ["data", "synth"],
                                     ["data", "info"], ["data", "render"]])
def test_every_subcommand_has_help(command: list[str]) -> None:
    from distill.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0


def test_console_script_and_module_agree() -> None:
    exe = Path(sys.executable).with_name("ecg-distill")
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    a = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    b = _cli("--help")
    assert a.stdout.replace("ecg-distill", "X") == b.stdout.replace("ecg-distill", "X")


def test_relation_without_aligned_tokens_is_refused_before_any_work() -> None:
    with pytest.raises(RecipeError, match=r"^distill\.weights\.relation: relation matching "
                                          r"compares the student with the teacher tokens"):
        recipe_from_dict({}, ["distill.weights.mhca=0", "distill.weights.ot=0"])
    recipe_from_dict({}, ["distill.weights.mhca=0"])  # ot still aligns


def test_synthetic_rates_must_hold_the_served_rate() -> None:
    with pytest.raises(RecipeError, match=r"data.sampling_rate: 500 Hz is read from 500 Hz records, not among"):
        recipe_from_dict({}, ["data.synthetic.rates=[100]", "data.sampling_rate=500"])
    with pytest.raises(RecipeError, match=r"data.synthetic.rates: 250 is not a PTB-XL rate"):
        recipe_from_dict({}, ["data.synthetic.rates=[250]"])


def test_a_0_1_key_that_disagrees_with_its_new_key_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"distill\.temperature: 4 disagrees with "
                                          r"distill\.kd\.temperature: 2"):
        recipe_from_dict({"distill": {"temperature": 4, "kd": {"temperature": 2}}})


def test_an_ablation_that_leaves_no_term_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"^ablations\.runs\.0: relation_only leaves no "
                                          r"distillation term weighted"):
        recipe_from_dict({"ablations": {"runs": ["relation_only"]}})
    assert recipe_from_dict({"ablations": {"runs": ["kd_only", "no_ot"]}}).ablations.runs


def test_a_with_ablation_turns_on_a_term_the_recipe_leaves_off() -> None:
    weights = {"kd": 1.0, "mhca": 1.0, "ot": 0.5, "relation": 0.0}
    assert AblationConfig.weights("with_relation", weights) == {**weights, "relation": 1.0}
    assert AblationConfig.weights("no_ot", weights) == {**weights, "ot": 0.0}
    recipe = recipe_from_dict({"distill": {"weights": {"relation": 0.0}},
                               "ablations": {"runs": ["with_relation"]}})
    assert recipe.ablations.runs == ["with_relation"]
    with pytest.raises(RecipeError, match=r"^ablations\.runs\.0: with_ot, but distill\.weights\.ot "
                                          r"is already on"):
        recipe_from_dict({"ablations": {"runs": ["with_ot"]}})
    with pytest.raises(RecipeError, match=r"^ablations\.runs\.0: .*with_bogus"):
        recipe_from_dict({"ablations": {"runs": ["with_bogus"]}})
    # relation needs mhca or ot: with both off, with_relation would change nothing
    with pytest.raises(RecipeError, match=r"^ablations\.runs\.0: with_relation changes "
                                          r"nothing"):
        recipe_from_dict({"distill": {"weights": {"kd": 1.0, "mhca": 0.0, "ot": 0.0,
                                                  "relation": 0.0}},
                          "ablations": {"runs": ["with_relation"]}})
