"""Distillation losses: hand-written references, invariances, masks, batch-versus-loop checks."""

from __future__ import annotations

import dataclasses
import itertools
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distill.losses
from distill.core.contract import ECGModelOutput
from distill.core.errors import RecipeError
from distill.core.schema import build as build_section
from distill.losses import (
    LOSSES,
    LossFamily,
    LossOutput,
    build_loss,
    discover,
    loss_class,
    loss_families,
    loss_family,
    register_loss,
)
from distill.losses.alignment import MHCAAlignment, MHCAConfig
from distill.losses.kd import KDConfig, MultiLabelKD
from distill.losses.objective import (
    DistillationObjective,
    ObjectiveOutput,
    build_objective,
    term_order,
)
from distill.losses.relation import RelationConfig, RelationMatching, pairwise_distances
from distill.losses.transport import OTConfig, OTLeadMatching


@dataclasses.dataclass
class LossWeights:
    """Weights given as a dataclass (as a recipe section may hold them)."""

    kd: float = 1.0
    mhca: float = 1.0
    ot: float = 1.0
    relation: float = 1.0


def make_out(batch: int = 3, tokens: int = 6, dim: int = 8, classes: int = 5, *,
             pooled_dim: int | None = None, mask: torch.Tensor | None = None, seed: int = 0,
             dtype: torch.dtype = torch.float32, requires_grad: bool = False) -> ECGModelOutput:
    """A random model output with the contract's shapes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)

    return ECGModelOutput(logits=rand(batch, classes), tokens=rand(batch, tokens, dim),
                          token_leads=torch.arange(tokens) % 12,
                          pooled=rand(batch, pooled_dim or dim), token_mask=mask)


def lengths_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, N)


def random_rotation(dim: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dtype))
    return q


# ----------------------------------------------------------------------------- kd


def bernoulli_kl_reference(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    """KL(Bern(p) || Bern(q)) per label, written out in float64, mean, times T²."""
    p = 1.0 / (1.0 + np.exp(-t / temperature))
    q = 1.0 / (1.0 + np.exp(-s / temperature))
    kl = p * np.log(p / q) + (1.0 - p) * np.log((1.0 - p) / (1.0 - q))
    return float(kl.mean() * temperature**2)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_equals_the_per_label_bernoulli_kl(temperature: float) -> None:
    s, t = make_out(4, classes=7, seed=1), make_out(4, classes=7, seed=2)
    s.logits, t.logits = s.logits * 3, t.logits * 3
    out = MultiLabelKD(temperature=temperature)(s, t, {})
    expected = bernoulli_kl_reference(s.logits.double().numpy(), t.logits.double().numpy(),
                                      temperature)
    np.testing.assert_allclose(out.value.item(), expected, rtol=1e-5)
    assert out.aux["per_label"].shape == (7,)


def test_kd_is_zero_for_equal_logits_and_nonnegative_and_finite_for_huge_ones() -> None:
    s = make_out(5, classes=6, seed=3)
    loss = MultiLabelKD(temperature=2.0)
    assert loss(s, s, {}).value.abs().item() < 1e-7
    big_s, big_t = make_out(5, classes=6, seed=4), make_out(5, classes=6, seed=5)
    big_s.logits = (big_s.logits * 80).requires_grad_()
    big_t.logits = big_t.logits * 80
    out = loss(big_s, big_t, {})
    assert torch.isfinite(out.value) and out.value.item() >= 0
    out.value.backward()
    assert torch.isfinite(big_s.logits.grad).all()
    per_label = loss(make_out(5, seed=6), make_out(5, seed=7), {}).aux["per_label"]
    assert (per_label >= 0).all()


@pytest.mark.parametrize("mode", ["binary", "softmax"])
def test_kd_gradient_pulls_the_student_towards_the_teacher(mode: str) -> None:
    s, t = make_out(4, classes=5, seed=8, requires_grad=True), make_out(4, classes=5, seed=9)
    loss = MultiLabelKD(temperature=2.0, mode=mode)
    loss(s, t, {}).value.backward()
    assert s.logits.grad.abs().sum() > 0
    assert t.logits.grad is None
    with torch.no_grad():
        stepped = s.logits - 1e-2 * s.logits.grad
    if mode == "binary":  # each label on its own moves towards the teacher's logit
        gap_before, gap_after = (s.logits - t.logits).abs(), (stepped - t.logits).abs()
        apart = gap_before > 1e-3
        assert apart.sum() > 10 and (gap_after[apart] < gap_before[apart]).all()
        assert (gap_after <= gap_before + 1e-7).all()
    else:  # softmax logits are defined up to a shift: compare the centred ones
        def centred(x: torch.Tensor) -> torch.Tensor:
            return x - x.mean(dim=1, keepdim=True)
        before = (centred(s.logits) - centred(t.logits)).norm()
        assert (centred(stepped) - centred(t.logits)).norm() < before
    s2 = ECGModelOutput(logits=stepped)
    assert loss(s2, t, {}).value < loss(s, t, {}).value


def test_kd_softmax_mode_is_classic_hinton_kd() -> None:
    s, t, temperature = make_out(6, classes=4, seed=10), make_out(6, classes=4, seed=11), 3.0
    out = MultiLabelKD(temperature=temperature, mode="softmax")(s, t, {})
    p = torch.softmax(t.logits.double() / temperature, dim=1)
    q = torch.softmax(s.logits.double() / temperature, dim=1)
    expected = (p * (p / q).log()).sum(dim=1).mean() * temperature**2
    torch.testing.assert_close(out.value.double(), expected, rtol=1e-5, atol=1e-7)
    classic = F.kl_div(F.log_softmax(s.logits / temperature, 1), F.softmax(t.logits / temperature,
                       1), reduction="batchmean") * temperature**2
    torch.testing.assert_close(out.value, classic, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["binary", "softmax"])
def test_kd_batch_equals_per_record_loop(mode: str) -> None:
    s, t = make_out(5, seed=12), make_out(5, seed=13)
    loss = MultiLabelKD(temperature=2.0, mode=mode)
    loop = [loss(ECGModelOutput(logits=s.logits[i:i + 1]), ECGModelOutput(logits=t.logits[i:i + 1]),
                 {}).value for i in range(5)]
    torch.testing.assert_close(loss(s, t, {}).value, torch.stack(loop).mean())


def test_kd_config_is_validated() -> None:
    with pytest.raises(ValueError, match=r"^temperature: must be > 0, got 0.0$"):
        KDConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"^mode: must be one of 'binary', 'softmax', got "
                                         r"'sigmoid'$"):
        MultiLabelKD(mode="sigmoid")
    with pytest.raises(ValueError, match="same labels"):
        MultiLabelKD()(make_out(classes=3), make_out(classes=4), {})


# ----------------------------------------------------------------------------- mhca


def test_mhca_handles_different_token_counts_and_widths() -> None:
    torch.manual_seed(0)
    s = make_out(3, tokens=5, dim=12, seed=14, requires_grad=True)
    t = make_out(3, tokens=17, dim=40, seed=15)
    loss = MHCAAlignment(12, 40, dim=16, heads=4)
    context: dict = {}
    out = loss(s, t, {}, context)
    assert out.aux["attention"].shape == (3, 4, 5, 17)
    assert context["mhca.attended"].shape == context["mhca.student"].shape == (3, 5, 16)
    torch.testing.assert_close(out.aux["attention"].sum(-1), torch.ones(3, 4, 5))
    out.value.backward()
    assert torch.isfinite(out.value) and s.tokens.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_mhca_padded_teacher_tokens_get_no_attention_and_change_nothing() -> None:
    torch.manual_seed(1)
    s, t = make_out(3, tokens=4, dim=8, seed=16), make_out(3, tokens=6, dim=10, seed=17)
    loss = MHCAAlignment(8, 10, dim=8, heads=2)
    plain = loss(s, t, {})
    garbage = torch.randn(3, 5, 10) * 1e4
    padded = ECGModelOutput(tokens=torch.cat([t.tokens, garbage], 1),
                            token_mask=lengths_mask([6, 6, 6], 11))
    out = loss(s, padded, {})
    assert (out.aux["attention"][..., 6:] == 0).all()
    torch.testing.assert_close(out.aux["attention"][..., :6], plain.aux["attention"])
    torch.testing.assert_close(out.value, plain.value)


def test_mhca_padded_student_tokens_are_left_out_and_empty_records_are_safe() -> None:
    torch.manual_seed(2)
    s, t = make_out(2, tokens=4, dim=8, seed=18), make_out(2, tokens=6, dim=10, seed=19)
    loss = MHCAAlignment(8, 10, dim=8, heads=2)
    plain = loss(s, t, {}).value
    padded = ECGModelOutput(tokens=torch.cat([s.tokens, torch.randn(2, 3, 8) * 1e3], 1),
                            token_mask=lengths_mask([4, 4], 7))
    torch.testing.assert_close(loss(padded, t, {}).value, plain)
    # a record without any real teacher token attends to nothing and adds nothing
    no_teacher = ECGModelOutput(tokens=t.tokens, token_mask=torch.tensor([[True] * 6, [False] * 6]))
    out = loss(s, no_teacher, {})
    assert (out.aux["attention"][1] == 0).all() and torch.isfinite(out.value)
    one = loss(ECGModelOutput(tokens=s.tokens[:1]), ECGModelOutput(tokens=t.tokens[:1]), {})
    torch.testing.assert_close(out.value, one.value)


def test_mhca_batch_equals_per_record_loop() -> None:
    torch.manual_seed(3)
    s_len, t_len = [5, 2, 4], [7, 3, 6]
    s = make_out(3, tokens=5, dim=8, seed=20, mask=lengths_mask(s_len, 5))
    t = make_out(3, tokens=7, dim=12, seed=21, mask=lengths_mask(t_len, 7))
    loss = MHCAAlignment(8, 12, dim=12, heads=3)
    out = loss(s, t, {})
    values = []
    for i, (ns, nt) in enumerate(zip(s_len, t_len)):
        one = loss(ECGModelOutput(tokens=s.tokens[i:i + 1, :ns]),
                   ECGModelOutput(tokens=t.tokens[i:i + 1, :nt]), {})
        torch.testing.assert_close(out.aux["attention"][i, :, :ns, :nt], one.aux["attention"][0])
        torch.testing.assert_close(out.aux["per_record"][i], one.value.detach())
        values.append(one.value * ns)
    torch.testing.assert_close(out.value, torch.stack(values).sum() / sum(s_len))


def test_mhca_values_are_fixed_so_the_target_cannot_collapse() -> None:
    torch.manual_seed(4)
    s, t = make_out(8, tokens=6, dim=12, seed=22), make_out(8, tokens=10, dim=20, seed=23)
    t.tokens = t.tokens * 1e3 + 50.0  # VLM-like scale: the layer norm makes it irrelevant
    loss = MHCAAlignment(12, 20, dim=16, heads=2)
    assert "value_proj" not in dict(loss.named_parameters())
    assert "value_proj" in loss.state_dict()
    opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        context: dict = {}
        value = loss(s, t, {}, context).value
        if first is None:
            first, target_scale = value.item(), context["mhca.attended"].pow(2).mean().item()
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < first  # the alignment learns ...
    # ... but not by shrinking the target: it stays a convex mix of fixed unit-scale vectors
    assert context["mhca.attended"].pow(2).mean().item() > 0.5 * target_scale > 0.01


def test_mhca_rejects_wrong_widths_and_bad_config() -> None:
    with pytest.raises(ValueError, match="built for widths student 8 / teacher 10"):
        MHCAAlignment(8, 10, dim=8, heads=2)(make_out(dim=9), make_out(dim=10), {})
    with pytest.raises(ValueError, match=r"^mhca.dim: 10 must be a multiple of heads"):
        MHCAAlignment(8, 10, dim=10, heads=4)
    with pytest.raises(ValueError, match=r"^heads: must be >= 1, got 0$"):
        MHCAAlignment(8, 10, dim=8, heads=0)
    with pytest.raises(ValueError, match=r"^dropout: must be < 1, got 1.0$"):
        MHCAConfig(dropout=1.0)


# ----------------------------------------------------------------------------- relation


def relation_loss(student: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor | None = None,
                  **config) -> LossOutput:
    out = ECGModelOutput(tokens=student, token_mask=mask)
    return RelationMatching(**config)(out, None, {}, {"mhca.attended": aligned})


@pytest.mark.parametrize("criterion", ["smooth_l1", "mse"])
def test_relation_is_zero_when_student_tokens_equal_the_aligned_teacher(criterion: str) -> None:
    x = make_out(3, tokens=7, dim=9, seed=24).tokens
    out = relation_loss(x, x.clone(), criterion=criterion)
    assert out.value.abs().item() < 1e-6
    y = make_out(3, tokens=7, dim=5, seed=25).tokens
    assert relation_loss(x, y, criterion=criterion).value.item() > 1e-3


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_relation_is_invariant_to_scale_and_rotation(side: str) -> None:
    x = make_out(3, tokens=7, dim=9, seed=26, dtype=torch.float64).tokens
    y = make_out(3, tokens=7, dim=9, seed=27, dtype=torch.float64).tokens
    mask = lengths_mask([7, 5, 3], 7)
    base = relation_loss(x, y, mask).value
    moved = 37.5 * (x if side == "student" else y) @ random_rotation(9, seed=1)
    args = (moved, y) if side == "student" else (x, moved)
    torch.testing.assert_close(relation_loss(*args, mask).value, base, rtol=1e-5, atol=1e-7)
    small = 1e-3 * (x if side == "student" else y)
    args = (small, y) if side == "student" else (x, small)
    torch.testing.assert_close(relation_loss(*args, mask).value, base, rtol=1e-5, atol=1e-7)


def test_relation_rkd_form_is_invariant_and_zero_for_equal_embeddings() -> None:
    s = make_out(6, pooled_dim=10, seed=28, dtype=torch.float64)
    t = make_out(6, pooled_dim=14, seed=29, dtype=torch.float64)
    loss = RelationMatching(token_relation=False, batch_rkd=True)
    base = loss(s, t, {})
    assert base.value.item() > 0 and set(base.aux) == {"rkd_distance", "rkd_angle"}
    moved_s = ECGModelOutput(pooled=0.01 * s.pooled @ random_rotation(10, seed=2))
    moved_t = ECGModelOutput(pooled=300.0 * t.pooled @ random_rotation(14, seed=3))
    torch.testing.assert_close(loss(moved_s, moved_t, {}).value, base.value, rtol=1e-5, atol=1e-8)
    assert loss(s, ECGModelOutput(pooled=s.pooled.clone()), {}).value.abs().item() < 1e-6


def test_relation_rkd_equals_loops_over_pairs_and_triplets() -> None:
    s = make_out(5, pooled_dim=6, seed=30, dtype=torch.float64).pooled
    t = make_out(5, pooled_dim=4, seed=31, dtype=torch.float64).pooled
    out = RelationMatching(token_relation=False, batch_rkd=True, criterion="mse")(
        ECGModelOutput(pooled=s), ECGModelOutput(pooled=t), {})
    a, b = s.numpy(), t.numpy()
    n = len(a)

    def dists(x: np.ndarray) -> np.ndarray:
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
        return d / d[~np.eye(n, dtype=bool)].mean()

    def angle(x: np.ndarray, i: int, j: int, k: int) -> float:
        u, v = x[j] - x[i], x[k] - x[i]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        return 0.0 if nu == 0 or nv == 0 else float(u @ v / (nu * nv))

    dist = np.mean((dists(a) - dists(b)) ** 2)
    ang = np.mean([(angle(a, i, j, k) - angle(b, i, j, k)) ** 2
                   for i, j, k in itertools.product(range(n), repeat=3)])
    np.testing.assert_allclose(out.aux["rkd_distance"].item(), dist, rtol=1e-6)
    np.testing.assert_allclose(out.aux["rkd_angle"].item(), ang, rtol=1e-6)
    np.testing.assert_allclose(out.value.item(), 25 * dist + 50 * ang, rtol=1e-6)


def test_relation_batch_equals_per_record_loop() -> None:
    lengths = [6, 2, 4, 1]
    mask = lengths_mask(lengths, 6)
    x = make_out(4, tokens=6, dim=5, seed=32).tokens
    y = make_out(4, tokens=6, dim=8, seed=33).tokens
    out = relation_loss(x, y, mask)
    per_record = []
    for i, n in enumerate(lengths):
        one = relation_loss(x[i:i + 1, :n], y[i:i + 1, :n])
        torch.testing.assert_close(out.aux["per_record"][i], one.value)
        per_record.append(one.value)
    assert per_record[3] == 0  # a single token has no relation
    torch.testing.assert_close(out.value, torch.stack(per_record[:3]).mean())


def test_relation_distances_are_exact_far_from_the_origin() -> None:
    x = make_out(2, tokens=5, dim=7, seed=34).tokens + 1e4  # float32, centred internally
    reference = torch.cdist(x.double(), x.double())
    torch.testing.assert_close(pairwise_distances(x).double(), reference, rtol=1e-4, atol=1e-3)


def test_relation_reads_mhca_first_then_ot_and_detaches_the_teacher() -> None:
    x = make_out(2, tokens=5, dim=6, seed=35, requires_grad=True)
    y = make_out(2, tokens=5, dim=6, seed=36).tokens.requires_grad_()
    loss = RelationMatching()
    via_ot = loss(x, None, {}, {"ot.barycentric": y})
    both = loss(x, None, {}, {"mhca.attended": y, "ot.barycentric": x.tokens})
    torch.testing.assert_close(via_ot.value, both.value)
    both.value.backward()
    assert y.grad is None and x.tokens.grad.abs().sum() > 0
    message = "relation: the token relation needs .* enable mhca or ot"
    with pytest.raises(ValueError, match=message):
        loss(x, None, {}, {})
    with pytest.raises(ValueError, match="^relation.token_relation: enable token_relation, "
                                         "batch_rkd or both$"):
        RelationMatching(token_relation=False)
    with pytest.raises(ValueError, match="^criterion: must be one of 'smooth_l1', 'mse'"):
        RelationMatching(criterion="l1")
    with pytest.raises(ValueError, match="^angle_weight: must be >= 0"):
        RelationConfig(angle_weight=-1.0)


# ----------------------------------------------------------------------------- objective


class Spy(nn.Module):
    """A loss that records its calls, writes a context entry, or refuses to be called."""

    def __init__(self, name: str, value: float, calls: list[str], *, refuse: bool = False) -> None:
        super().__init__()
        self.name, self.value, self.calls, self.refuse = name, value, calls, refuse

    def forward(self, student_out, teacher_out, batch, context) -> LossOutput:
        if self.refuse:
            raise AssertionError(f"{self.name} has weight 0 and must not be computed")
        self.calls.append(self.name)
        context[f"{self.name}.seen"] = sorted(context)
        return LossOutput(student_out.logits.sum() * 0 + self.value, {"context": torch.zeros(1)})


def test_objective_total_equals_the_formula_from_its_breakdown() -> None:
    torch.manual_seed(5)
    s = make_out(4, tokens=5, dim=8, classes=3, seed=37, requires_grad=True)
    t = make_out(4, tokens=9, dim=12, classes=3, seed=38)
    labels = torch.randint(0, 2, (4, 3)).float()
    weights = {"kd": 0.7, "mhca": 1.3, "ot": 0.0, "relation": 0.4}
    objective = build_objective(0.3, weights, 8, 12, mhca={"dim": 8, "heads": 2},
                                relation={"batch_rkd": True})
    out = objective(s, t, {"labels": labels})
    assert isinstance(out, ObjectiveOutput) and set(out.terms) == {"task", "kd", "mhca", "relation"}
    assert all(not v.requires_grad for v in out.terms.values())
    expected = 0.7 * out.terms["task"] + 0.3 * sum(weights[k] * out.terms[k]
                                                    for k in ("kd", "mhca", "relation"))
    torch.testing.assert_close(out.total.detach(), expected)
    torch.testing.assert_close(out.terms["task"],
                               F.binary_cross_entropy_with_logits(s.logits, labels).detach())
    assert out.aux["mhca.attention"].shape == (4, 2, 5, 9) and "relation.rkd_angle" in out.aux
    out.total.backward()
    assert all(p.grad is not None for p in objective.parameters())
    assert "ot" not in objective.losses  # a zero-weight term is not even built


def test_objective_does_not_compute_zero_weight_terms_and_runs_relation_last() -> None:
    calls: list[str] = []
    losses = {"relation": Spy("relation", 4.0, calls), "mhca": Spy("mhca", 2.0, calls),
              "ot": Spy("ot", 3.0, calls, refuse=True), "kd": Spy("kd", 1.0, calls)}
    objective = DistillationObjective(0.5, {"relation": 1.0, "mhca": 2.0, "ot": 0.0, "kd": 1.0},
                                      losses)
    s = make_out(2, classes=3, seed=39)
    out = objective(s, s, {"labels": torch.ones(2, 3)})
    assert calls == ["kd", "mhca", "relation"] and "ot" not in out.terms
    assert out.aux["relation.context"].shape == (1,)
    expected = 0.5 * out.terms["task"] + 0.5 * (1.0 * 1.0 + 2.0 * 2.0 + 1.0 * 4.0)
    torch.testing.assert_close(out.total, expected)
    assert term_order(["relation", "custom", "ot", "kd"]) == ["kd", "ot", "custom", "relation"]


def test_objective_with_alpha_zero_is_plain_bce_and_calls_nothing() -> None:
    losses = {name: Spy(name, 1.0, [], refuse=True) for name in ("kd", "mhca", "ot", "relation")}
    objective = DistillationObjective(0.0, {name: 1.0 for name in losses}, losses)
    s = make_out(5, classes=4, seed=40, requires_grad=True)
    labels = torch.randint(0, 2, (5, 4)).float()
    out = objective(s, None, {"labels": labels})
    assert out.total == F.binary_cross_entropy_with_logits(s.logits, labels)
    assert set(out.terms) == {"task"} and out.aux == {}
    assert list(build_objective(0.0, LossWeights(), 8, 8).parameters()) == []


def test_objective_and_registry_errors() -> None:
    message = "unknown loss 'otl'; did you mean 'ot'? (known: codes, kd, mhca, ot, relation)"
    with pytest.raises(ValueError) as info:
        build_objective(0.5, {"kd": 1.0, "otl": 1.0}, 8, 8)
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:  # configured but not weighted: refused as well
        build_objective(0.5, {"kd": 1.0}, 8, 8, otl={"reg": 0.1})
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        build_loss("otl")
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        register_loss("kd", config=KDConfig)(type("AnotherKD", (nn.Module,), {}))
    assert str(info.value) == "loss 'kd' is already registered by MultiLabelKD"
    assert isinstance(build_loss("kd", temperature=4.0), MultiLabelKD)
    with pytest.raises(ValueError, match=r"no loss module for weighted term\(s\) \['mhca'\]"):
        DistillationObjective(0.5, {"kd": 1.0, "mhca": 1.0}, {"kd": MultiLabelKD()})
    with pytest.raises(ValueError, match="alpha must lie in"):
        DistillationObjective(1.5, {}, {})
    with pytest.raises(ValueError, match="weights must be >= 0"):
        DistillationObjective(0.5, {"kd": -1.0}, {"kd": MultiLabelKD()})


def test_build_objective_passes_widths_and_configs() -> None:
    objective = DistillationObjective.build(1.0, LossWeights(kd=2.0, mhca=1.0, ot=0.0,
                                                             relation=0.0), 16, 24,
                                            kd={"temperature": 5.0, "mode": "softmax"},
                                            mhca={"dim": 32, "heads": 8})
    kd, mhca = objective.losses["kd"], objective.losses["mhca"]
    assert kd.config == KDConfig(temperature=5.0, mode="softmax")
    assert (mhca.student_dim, mhca.teacher_dim, mhca.config.dim, mhca.config.heads) == (16, 24, 32, 8)
    assert set(objective.losses) == {"kd", "mhca"}
    s, t = make_out(2, dim=16, seed=41), make_out(2, dim=24, seed=42)
    out = objective(s, t, {"labels": torch.zeros(2, 5)})  # alpha = 1: the task is only logged
    torch.testing.assert_close(out.total, 2.0 * out.terms["kd"] + out.terms["mhca"])


def test_relation_after_ot_when_mhca_is_off() -> None:
    torch.manual_seed(6)
    objective = build_objective(0.5, {"kd": 0.0, "mhca": 0.0, "ot": 1.0, "relation": 1.0}, 8, 12)
    s = make_out(3, tokens=5, dim=8, seed=43, requires_grad=True)
    t = make_out(3, tokens=9, dim=12, seed=44)
    out = objective(s, t, {"labels": torch.ones(3, 5)})
    assert {"ot", "relation"} <= set(out.terms) and torch.isfinite(out.total)
    # relation compared the student with exactly the OT barycentric projection
    direct = objective.losses["relation"](s, t, {}, {"ot.barycentric": out.aux["ot.barycentric"]})
    torch.testing.assert_close(out.terms["relation"], direct.value.detach())
    out.total.backward()
    assert s.tokens.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- registry


BUILT_INS = ("kd", "mhca", "ot", "relation")


def test_discovery_finds_the_four_built_ins_with_their_configs_and_places() -> None:
    discover()
    discover()  # idempotent
    assert set(BUILT_INS) <= set(LOSSES.names())
    expected = {"kd": (MultiLabelKD, KDConfig, 10, ()),
                "mhca": (MHCAAlignment, MHCAConfig, 20, ()),
                "ot": (OTLeadMatching, OTConfig, 30, ()),
                "relation": (RelationMatching, RelationConfig, 90, ("mhca", "ot"))}
    for name, (cls, config, order, requires) in expected.items():
        family = loss_family(name)
        assert isinstance(family, LossFamily) and family.name == name
        assert (family.cls, family.config, family.order, family.requires_any) == \
            (cls, config, order, requires)
        assert family.default_weight == 1.0 and cls.loss_name == name
        assert loss_class(name) is cls
    assert [f.name for f in loss_families() if f.name in BUILT_INS] == list(BUILT_INS)


def test_discovery_imports_a_new_module_of_the_package(tmp_path, monkeypatch) -> None:
    """A new file in the package that calls register_loss is found by discover() alone."""
    (tmp_path / "zz_probe_loss.py").write_text('''
from dataclasses import dataclass

import torch
from torch import nn

from distill.core.schema import spec
from distill.losses import LossOutput, check_fields, register_loss


@dataclass
class ProbeConfig:
    scale: float = spec(1.0, help="a factor", gt=0)

    def __post_init__(self) -> None:
        check_fields(self)


@register_loss("zz_probe", config=ProbeConfig, order=40)
class ProbeLoss(nn.Module):
    def __init__(self, student_dim: int, *, scale: float = 1.0) -> None:
        super().__init__()
        self.config = ProbeConfig(scale=scale)
        self.student_dim = student_dim

    def forward(self, student_out, teacher_out, batch=None, context=None):
        return LossOutput(student_out.logits.sum() * 0 + self.config.scale, {})
''')
    monkeypatch.setattr(distill.losses, "__path__", [*distill.losses.__path__, str(tmp_path)])
    try:
        assert "zz_probe" not in LOSSES
        discover()
        family = loss_family("zz_probe")
        assert (family.order, family.default_weight, family.dims) == (40, 0.0, ("student_dim",))
        assert [f.name for f in loss_families()] == ["kd", "mhca", "ot", "codes", "zz_probe",
                                                     "relation"]
        objective = build_objective(0.5, {"relation": 1.0, "zz_probe": 2.0, "mhca": 1.0}, 8, 10,
                                    zz_probe={"scale": 3.0}, mhca={"dim": 8, "heads": 2})
        assert list(objective.losses) == ["mhca", "zz_probe", "relation"]
        assert objective.losses["zz_probe"].student_dim == 8  # it asked for this width only
        assert objective.active_terms == ["mhca", "zz_probe", "relation"]
        discover()  # importing again registers nothing twice
    finally:
        LOSSES.unregister("zz_probe")
        sys.modules.pop("distill.losses.zz_probe_loss", None)


def test_registering_a_duplicate_or_a_mismatched_loss_fails() -> None:
    @dataclasses.dataclass
    class TmpConfig:
        k: int = 1

    class Tmp(nn.Module):
        def __init__(self, *, k: int = 1) -> None:
            super().__init__()

    try:
        register_loss("zz_tmp", config=TmpConfig)(Tmp)
        with pytest.raises(ValueError, match="^loss 'zz_tmp' is already registered by Tmp$"):
            register_loss("zz_tmp", config=TmpConfig)(Tmp)
    finally:
        LOSSES.unregister("zz_tmp")
    with pytest.raises(ValueError, match="^loss 'ot' is already registered by OTLeadMatching"):
        register_loss("ot", config=OTConfig)(OTLeadMatching)

    class Other(nn.Module):
        def __init__(self, *, j: int = 1) -> None:
            super().__init__()

    class Default(nn.Module):
        def __init__(self, *, k: int = 2) -> None:
            super().__init__()

    with pytest.raises(TypeError, match=r"takes \['j'\], its config TmpConfig has fields \['k'\]"):
        register_loss("zz_tmp", config=TmpConfig)(Other)
    with pytest.raises(TypeError, match="default k=2, config TmpConfig says 1"):
        register_loss("zz_tmp", config=TmpConfig)(Default)
    with pytest.raises(TypeError, match="config must be a dataclass"):
        register_loss("zz_tmp", config=dict)(Tmp)
    assert "zz_tmp" not in LOSSES


def test_unknown_loss_suggests_the_closest_name() -> None:
    with pytest.raises(ValueError) as info:
        loss_family("otl")
    assert str(info.value) == "unknown loss 'otl'; did you mean 'ot'? (known: codes, kd, mhca, " \
                              "ot, relation)"
    with pytest.raises(ValueError, match=r"^unknown loss 'xyz' \(known: codes, kd, mhca, ot, "
                                         r"relation\)"):
        loss_family("xyz")


def test_build_order_is_kd_mhca_ot_relation_and_keeps_the_published_initialisation() -> None:
    """Parameters draw from the global RNG in build order: kd, mhca, ot, relation, whatever
    the order of the weights; the values are those of the published runs."""
    torch.manual_seed(0)
    objective = build_objective(0.5, {"relation": 1.0, "ot": 1.0, "mhca": 1.0, "kd": 1.0}, 8,
                                12, mhca={"dim": 8, "heads": 2}, ot={"dim": 12})
    assert list(objective.losses) == ["kd", "mhca", "ot", "relation"]
    assert objective.active_terms == ["kd", "mhca", "ot", "relation"]
    assert term_order(["relation", "ot", "mhca", "kd"]) == ["kd", "mhca", "ot", "relation"]
    torch.manual_seed(0)
    by_hand = {"kd": MultiLabelKD(), "mhca": MHCAAlignment(8, 12, dim=8, heads=2),
               "ot": OTLeadMatching(8, 12, dim=12), "relation": RelationMatching()}
    for name, loss in by_hand.items():
        for key, value in loss.state_dict().items():
            assert torch.equal(objective.losses[name].state_dict()[key], value), (name, key)
    published = {"mhca.value_proj": -3.7530865017, "mhca.student_proj.weight": -1.345813524,
                 "mhca.student_proj.bias": 0.4016784756, "mhca.query.weight": -1.3168847179,
                 "mhca.query.bias": 1.1452082479, "mhca.key.weight": -2.1939205949,
                 "mhca.key.bias": 0.0588593401, "ot.student_proj.weight": 1.6750374567,
                 "ot.teacher_proj.weight": 3.1998935773}  # sums, from the release before 0.2
    state = objective.losses.state_dict()
    assert set(state) == set(published)
    for key, value in published.items():
        np.testing.assert_allclose(state[key].double().sum().item(), value, rtol=1e-6,
                                   atol=1e-7, err_msg=key)


def test_a_term_needs_one_of_its_requirements_weighted() -> None:
    message = r"^objective: 'relation' needs one of mhca, ot weighted > 0"
    with pytest.raises(ValueError, match=message):
        build_objective(0.5, {"kd": 1.0, "mhca": 0.0, "relation": 1.0}, 8, 8)
    with pytest.raises(ValueError, match=message):  # absent counts as unweighted
        build_objective(0.5, {"relation": 1.0}, 8, 8)
    with pytest.raises(ValueError, match=message):
        DistillationObjective(0.5, {"relation": 1.0}, {"relation": RelationMatching()})
    # one of them is enough; and with alpha = 0 or relation unweighted nothing runs
    assert set(build_objective(0.5, {"ot": 1.0, "relation": 1.0}, 8, 8, ot={"dim": 8}).losses) \
        == {"ot", "relation"}
    assert list(build_objective(0.0, {"relation": 1.0}, 8, 8).losses) == []
    assert list(build_objective(0.5, {"kd": 1.0, "relation": 0.0}, 8, 8).losses) == ["kd"]


def test_config_instances_build_the_same_objective_as_mappings() -> None:
    torch.manual_seed(7)
    s = make_out(3, tokens=5, dim=8, classes=4, seed=50, requires_grad=True)
    t = make_out(3, tokens=9, dim=12, classes=4, seed=51)
    labels = torch.randint(0, 2, (3, 4)).float()
    weights = {"kd": 0.5, "mhca": 1.0, "ot": 0.7, "relation": 0.3}
    configs = {"kd": KDConfig(temperature=3.0, mode="softmax"),
               "mhca": MHCAConfig(dim=16, heads=2, dropout=0.0),
               "ot": OTConfig(dim=12, reg=0.1, iters=20, lead_prior=0.2),
               "relation": RelationConfig(criterion="mse", batch_rkd=True)}
    results = []
    for as_mapping in (False, True):
        given = {k: dataclasses.asdict(v) if as_mapping else v for k, v in configs.items()}
        torch.manual_seed(0)
        objective = build_objective(0.4, weights, 8, 12, **given)
        assert {k: loss.config for k, loss in objective.losses.items()} == configs
        out = objective(s, t, {"labels": labels})
        grads = torch.autograd.grad(out.total, [s.tokens, *objective.parameters()])
        results.append((objective.state_dict(), out, grads))
    (state_a, out_a, grads_a), (state_b, out_b, grads_b) = results
    assert list(state_a) == list(state_b)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(out_a.total, out_b.total)
    assert all(torch.equal(out_a.terms[k], out_b.terms[k]) for k in out_a.terms)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    # a config of another family, or an unknown key, is refused
    with pytest.raises(TypeError, match="kd: expected a KDConfig or a mapping, got OTConfig"):
        build_objective(0.5, {"kd": 1.0}, 8, 8, kd=OTConfig())
    with pytest.raises(RecipeError, match=r"^unknown key 'ot.regg'; did you mean 'ot.reg'\?$"):
        build_objective(0.5, {"kd": 1.0}, 8, 8, ot={"regg": 0.1})


def test_each_config_is_a_recipe_section_with_the_recipe_defaults() -> None:
    """Plain field types, help text and ranges on every field; the recipe's defaults; and the
    strict schema converter builds and checks them."""
    defaults = {"kd": {"temperature": 2.0}, "mhca": {"dim": 128, "heads": 4},
                "ot": {"dim": 128, "reg": 0.05, "iters": 50, "lead_prior": 0.0},
                "relation": {"criterion": "smooth_l1", "batch_rkd": False}}
    for name, values in defaults.items():
        family = loss_family(name)
        config = family.config()
        assert {k: getattr(config, k) for k in values} == values
        for f in dataclasses.fields(family.config):
            assert f.metadata.get("help"), (name, f.name)
        assert build_section(family.config, {}, f"distill.{name}") == config
        # the constructor takes exactly the fields (plus the widths it needs)
        loss = family.cls(**{k: None if k == "teacher_form" else 8 for k in family.dims},
                          **dataclasses.asdict(config))
        assert loss.config == config
        assert family.build(student_dim=8, teacher_dim=8).config == config
    assert build_section(MHCAConfig, {"dim": 64, "heads": 8}, "distill.mhca") == \
        MHCAConfig(dim=64, heads=8)
    with pytest.raises(RecipeError, match=r"^distill.mhca.dim: 10 must be a multiple of heads "
                                          r"\(distill.mhca.heads=4\)$"):
        build_section(MHCAConfig, {"dim": 10}, "distill.mhca")
    with pytest.raises(RecipeError, match=r"^distill.ot.reg: must be > 0, got 0.0$"):
        build_section(OTConfig, {"reg": 0.0}, "distill.ot")
    with pytest.raises(RecipeError, match=r"^distill.kd.mode: 'sofmax' is not one of 'binary', "
                                          r"'softmax'; did you mean 'softmax'\?$"):
        build_section(KDConfig, {"mode": "sofmax"}, "distill.kd")
    with pytest.raises(RecipeError, match=r"^distill.relation.token_relation: enable"):
        build_section(RelationConfig, {"token_relation": False}, "distill.relation")
    with pytest.raises(RecipeError, match=r"^unknown key 'distill.ot.iter'; did you mean "
                                          r"'distill.ot.iters'\?$"):
        build_section(OTConfig, {"iter": 5}, "distill.ot")
