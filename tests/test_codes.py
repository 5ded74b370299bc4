"""Code-distribution distillation (issue 20, deliverable 4a): a tokenized teacher's per-token
code distributions, their top-code storage in the teacher cache, and the ``codes`` loss."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import teachers
from distill.core.contract import ECGModelOutput, check_output
from distill.engine.jobs import cached_teacher_output
from distill.engine.teacher_cache import CODE_TOP, expand_codes, teacher_outputs, top_codes
from distill.losses import build_loss, loss_family
from distill.losses.codes import CodeDistillation, relative_time
from distill.losses.objective import build_objective
from distill.models.hypnos import HypnosForNextToken, code_logits, hypnos_config
from distill.models.rvq import RVQTokenizer, RVQTokenizerConfig

SAMPLES = 400  # 4 s at 100 Hz: 10 patches of 0.4 s
SMALL_RVQ = {"stem_channels": 8, "hidden_size": 16, "codebook_dim": 8, "num_quantizers": 3,
             "codebook_size": 32}


def _signal(batch: int, leads: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, leads, SAMPLES, generator=torch.Generator().manual_seed(seed))


def _tokenizer() -> RVQTokenizer:
    torch.manual_seed(0)
    tok = RVQTokenizer(RVQTokenizerConfig(input_samples=SAMPLES, patch_size=40, **SMALL_RVQ))
    tok.quantizer.quantize_dropout = False
    tok(_signal(8))  # k-means initialisation of every codebook
    return tok.eval()


def _hypnos_folder(tmp: Path) -> Path:
    tok = _tokenizer()
    model = HypnosForNextToken(hypnos_config(tok, num_labels=2, hidden_size=32, num_layers=1,
                                             num_heads=1, depth_hidden_size=32, depth_layers=1))
    model.hypnos.tokenizer.load_state_dict(tok.state_dict())
    model.save_pretrained(tmp / "hypnos")
    return tmp / "hypnos"


# ---------------------------------------------------------------- the teacher's distributions


def test_code_distributions_are_the_gaussian_mixture_posterior_of_each_residual() -> None:
    tok = _tokenizer()
    x = _signal(2, leads=3, seed=1)
    logp = code_logits(tok, x, 2)  # (B, L, N, 2, C)
    codes = tok.encode(x)
    assert logp.shape == (2, 3, 10, 2, 32)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 3, 10, 2))
    assert torch.equal(logp.argmax(-1), codes[..., :2])  # the code encode chooses
    # level 2 from the definition: an isotropic Gaussian per code around the first
    # level's residual, variance the record's mean squared quantization error per dimension
    z = tok._latents(x).detach()  # (B*L, N, d)
    books = tok.quantizer.codebooks.detach()
    first = books[0][codes[..., 0].reshape(6, 10)]
    residual = (z - first).reshape(2, 30, -1)
    second = books[1][codes[..., 1].reshape(2, 30)]
    for b in range(2):
        var = (residual[b] - second[b]).square().sum(-1).mean() / z.shape[-1]
        gauss = torch.distributions.Normal(books[1][None], var.sqrt())  # (1, C, d)
        ref = gauss.log_prob(residual[b][:, None]).sum(-1).log_softmax(-1)  # (30, C)
        torch.testing.assert_close(logp[b, :, :, 1].reshape(30, -1), ref, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="levels must be in 1..3, got 4"):
        code_logits(tok, x, 4)


def test_a_hypnos_teacher_gives_code_distributions_in_its_token_order(tmp_path: Path) -> None:
    teacher = teachers.create("foundation", _hypnos_folder(tmp_path), num_labels=2,
                              train_mode="frozen")
    x = _signal(2)
    assert teacher(signal=x).code_logits is None  # only when asked
    teacher.code_levels = 2
    out = teacher(signal=x)
    check_output(out, batch_size=2, num_labels=2, where="hypnos teacher")
    assert out.code_logits.shape == (2, 120, 2, 32)  # 12 leads x 10 patches, lead-major
    codes = teacher.hf_model.tokenizer.encode(x)  # (B, 12, 10, K)
    assert torch.equal(out.code_logits.argmax(-1), codes[..., :2].reshape(2, 120, 2))
    assert torch.equal(out.token_leads, torch.arange(12).repeat_interleave(10))


def test_teachers_without_codes_refuse_to_give_them() -> None:
    teacher = teachers.create("signal", num_labels=2, sampling_rate=100)
    teacher.code_levels = 1
    with pytest.raises(ValueError, match="gives no code distributions: the codes loss"):
        teacher(**teacher.example_inputs(1, torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------- storage


def test_top_codes_round_trip_keeps_the_likely_codes_and_the_total_mass() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 2, 64, generator=gen) * 4
    idx, logp = top_codes(logits, top=16)
    assert idx.dtype == torch.int16 and idx.shape == (4, 5, 2, 16)
    full = expand_codes(idx, logp, 64)
    exact = logits.log_softmax(-1)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(4, 5, 2))
    torch.testing.assert_close(full.gather(-1, idx.long()), exact.gather(-1, idx.long()))
    assert torch.equal(full.argmax(-1), exact.argmax(-1))
    rest = 1 - exact.exp().topk(16, -1).values.sum(-1)
    others = full.exp().sum(-1) - full.exp().gather(-1, idx.long()).sum(-1)
    torch.testing.assert_close(others, rest, atol=1e-5, rtol=1e-4)
    # every code kept: the round trip is exact
    idx, logp = top_codes(logits[..., :CODE_TOP], top=CODE_TOP)
    torch.testing.assert_close(expand_codes(idx, logp, CODE_TOP),
                               logits[..., :CODE_TOP].log_softmax(-1), atol=1e-5, rtol=1e-5)


class _Records(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x = _signal(n, seed=3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"index": i, "teacher": self.x[i]}


def test_the_cache_stores_top_codes_and_a_batch_rebuilds_the_distributions(tmp_path) -> None:
    teacher = teachers.create("foundation", _hypnos_folder(tmp_path), num_labels=2,
                              train_mode="frozen")
    teacher.code_levels = 2
    records = _Records(5)
    cache = teacher_outputs(teacher, records, lambda b: {"signal": b["teacher"]}, key="k",
                            cache_dir=tmp_path / "cache", batch_size=2, progress=False)
    assert cache.code_shape == (2, 32)
    assert cache.code_idx.shape == (5, 120, 2, CODE_TOP) and cache.code_idx.dtype == np.int16
    extras = cache.extras()
    batch = {name: torch.from_numpy(np.array(a[:3])) for name, a in extras.items()}
    rebuilt = cached_teacher_output(batch, cache.token_leads, cache.codebook_size)
    live = teacher(signal=records.x[:3])
    kept = torch.from_numpy(np.array(cache.code_idx[:3])).long()
    exact = live.code_logits.log_softmax(-1)
    torch.testing.assert_close(rebuilt.code_logits.gather(-1, kept), exact.gather(-1, kept),
                               atol=2e-2, rtol=2e-3)  # float16 log-probabilities
    torch.testing.assert_close(rebuilt.code_logits.exp().sum(-1), torch.ones(3, 120, 2),
                               atol=1e-3, rtol=0)
    # without code levels nothing more is stored (and the entry keeps its old layout)
    teacher.code_levels = 0
    plain = teacher_outputs(teacher, records, lambda b: {"signal": b["teacher"]}, key="p",
                            cache_dir=tmp_path / "cache", batch_size=2, progress=False)
    assert plain.code_shape is None and "teacher.code_idx" not in plain.extras()
    assert sorted(p.name for p in plain.folder.iterdir()) == [
        "logits.npy", "meta.json", "pooled.npy", "tokens.npy"]


# ---------------------------------------------------------------- the loss


def test_relative_time_ranks_tokens_within_their_lead() -> None:
    leads = torch.tensor([0, 0, 0, 1, 1, 1, 0])
    torch.testing.assert_close(relative_time(leads),
                               torch.tensor([0.5, 1.5, 2.5, 0.5, 1.5, 2.5, 3.5])
                               / torch.tensor([4, 4, 4, 3, 3, 3, 4.]))
    torch.testing.assert_close(relative_time(torch.full((4,), -1)),
                               torch.tensor([0.125, 0.375, 0.625, 0.875]))


def _outputs(batch: int = 3, levels: int = 2, codebook: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    student = ECGModelOutput(tokens=torch.randn(batch, 7, 12, generator=gen, requires_grad=True),
                             token_leads=torch.full((7,), -1))
    teacher = ECGModelOutput(code_logits=torch.randn(batch, 8, levels, codebook, generator=gen)
                             * 3, token_leads=torch.arange(2).repeat_interleave(4))
    return student, teacher


def test_codes_loss_is_the_temperature_scaled_kl_of_the_code_distributions() -> None:
    torch.manual_seed(0)
    loss = build_loss("codes", student_dim=12, teacher_codes=(2, 16), levels=2,
                      temperature=2.0, dim=16, heads=2)
    student, teacher = _outputs()
    out = loss(student, teacher)
    predicted = loss.predict(student.tokens, student.token_leads, teacher.token_leads)
    assert predicted.shape == (3, 8, 2, 16)
    ref = F.kl_div(F.log_softmax(predicted / 2, -1), F.log_softmax(teacher.code_logits / 2, -1),
                   log_target=True, reduction="none").sum(-1) * 4
    torch.testing.assert_close(out.value, ref.mean())
    torch.testing.assert_close(out.aux["per_level"], ref.mean(dim=(0, 1)))
    assert out.aux["agreement"].shape == (2,)
    out.value.backward()
    assert student.tokens.grad is not None and student.tokens.grad.abs().sum() > 0
    # only the first `levels` of the teacher's levels are read
    one = build_loss("codes", student_dim=12, teacher_codes=(2, 16), levels=1, dim=16, heads=2)
    assert one(student, teacher).aux["per_level"].shape == (1,)


def test_codes_loss_can_read_only_the_students_leads() -> None:
    """leads: student keeps the teacher tokens of the leads the student reads: the same
    value as the whole term given those tokens alone."""
    student, teacher = _outputs()  # teacher tokens: leads 0 and 1, four each
    torch.manual_seed(0)
    mine = build_loss("codes", student_dim=12, teacher_codes=(2, 16), student_leads=(1, 5),
                      leads="student", dim=16)
    torch.manual_seed(0)
    every = build_loss("codes", student_dim=12, teacher_codes=(2, 16), dim=16)
    lead1 = ECGModelOutput(code_logits=teacher.code_logits[:, 4:],
                           token_leads=teacher.token_leads[4:])
    torch.testing.assert_close(mine(student, teacher).value, every(student, lead1).value)
    with pytest.raises(ValueError, match=r"no token of the student's leads \[7\]"):
        build_loss("codes", student_dim=12, teacher_codes=(2, 16), student_leads=(7,),
                   leads="student", dim=16)(student, teacher)
    with pytest.raises(ValueError, match="the student reads no signal leads"):
        build_loss("codes", student_dim=12, teacher_codes=(2, 16), leads="student")


def test_codes_loss_leaves_out_the_teacher_tokens_of_missing_leads() -> None:
    """A teacher token_mask (data.on_flat_lead: mask) drops those tokens from the mean: the
    value equals the term on the kept tokens alone, and their targets do not matter."""
    student, teacher = _outputs()  # teacher tokens: leads 0 and 1, four each
    torch.manual_seed(0)
    loss = build_loss("codes", student_dim=12, teacher_codes=(2, 16), dim=16)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, :4] = False  # record 1 lacks lead 0
    masked = ECGModelOutput(code_logits=teacher.code_logits, token_leads=teacher.token_leads,
                            token_mask=mask)
    out = loss(student, masked)
    t = loss.config.temperature
    kl = F.kl_div(F.log_softmax(loss.predict(student.tokens, student.token_leads,
                                             teacher.token_leads) / t, -1),
                  F.log_softmax(teacher.code_logits[:, :, :loss.config.levels] / t, -1),
                  log_target=True, reduction="none").sum(-1) * t ** 2  # (B, N_t, levels)
    torch.testing.assert_close(out.value, kl[mask].mean())
    torch.testing.assert_close(out.aux["per_level"], kl[mask].mean(0))
    changed = teacher.code_logits.clone()
    changed[1, :4] = torch.randn_like(changed[1, :4]) * 5
    again = loss(student, ECGModelOutput(code_logits=changed, token_leads=teacher.token_leads,
                                         token_mask=mask))
    torch.testing.assert_close(again.value, out.value)
    # a mask of all True is the plain term
    full = ECGModelOutput(code_logits=teacher.code_logits, token_leads=teacher.token_leads,
                          token_mask=torch.ones(3, 8, dtype=torch.bool))
    torch.testing.assert_close(loss(student, full).value, loss(student, teacher).value)


def test_codes_loss_learns_distributions_that_depend_on_time_and_lead() -> None:
    """Teacher distributions that are a function of each token's lead and time: a student
    whose tokens say nothing still reaches them through the queries' positions."""
    torch.manual_seed(0)
    loss = CodeDistillation(12, (1, 8), levels=1, dim=32, heads=2)
    leads = torch.arange(3).repeat_interleave(5)
    target = torch.zeros(4, 15, 1, 8)
    target[..., 0, :].scatter_(-1, ((torch.arange(15) * 7) % 8)[None, :, None].expand(4, -1, -1),
                               6.0)
    teacher = ECGModelOutput(code_logits=target, token_leads=leads)
    student = ECGModelOutput(tokens=torch.zeros(4, 5, 12), token_leads=torch.full((5,), -1))
    opt = torch.optim.Adam(loss.parameters(), lr=3e-3)
    first = loss(student, teacher).value.item()
    for _ in range(300):
        opt.zero_grad()
        value = loss(student, teacher)
        value.value.backward()
        opt.step()
    assert value.value.item() < 0.1 * first
    assert value.aux["agreement"].item() == 1.0


def test_codes_loss_errors_name_what_is_missing() -> None:
    with pytest.raises(ValueError, match="the teacher gives no code distributions"):
        build_loss("codes", student_dim=8)
    with pytest.raises(ValueError, match="levels is 3, but the teacher gives code distributions "
                                         "for 2 level"):
        build_loss("codes", student_dim=8, teacher_codes=(2, 16), levels=3)
    loss = build_loss("codes", student_dim=12, teacher_codes=(2, 16), dim=16)
    student, teacher = _outputs(codebook=32)
    with pytest.raises(ValueError, match=r"teacher code_logits \(3, 8, 2, 32\), expected "
                                         r"\[B, N_t, >=1, 16\]"):
        loss(student, teacher)
    with pytest.raises(ValueError, match="the teacher's output has no code_logits"):
        loss(student, ECGModelOutput(token_leads=teacher.token_leads))
    with pytest.raises(ValueError, match="dim: 10 must be a multiple of heads"):
        loss_family("codes").build({"dim": 10, "heads": 4}, student_dim=8, teacher_codes=(1, 4))


def test_the_objective_passes_the_teachers_code_shape_and_runs_the_term() -> None:
    torch.manual_seed(0)
    objective = build_objective(0.5, {"kd": 1.0, "codes": 1.0}, 12, 4, teacher_codes=(2, 16),
                                codes={"levels": 2, "dim": 16})
    student, teacher = _outputs()
    student.logits = torch.zeros(3, 2)
    teacher.logits = torch.zeros(3, 2)
    out = objective(student, teacher, {"labels": torch.zeros(3, 2)})
    assert set(out.terms) == {"task", "kd", "codes"} and out.terms["codes"] > 0
    assert out.aux["codes.per_level"].shape == (2,)
    # off (weight 0): not built, and no teacher codes needed
    assert "codes" not in build_objective(0.5, {"kd": 1.0, "codes": 0.0}, 12, 4).losses


def test_a_recipe_without_the_codes_term_keeps_its_hashes() -> None:
    """The family added in 0.4 stays out of the distill section's hash while it is off at
    its defaults (runs made before it resume); turning it on changes the hash."""
    from distill.recipe import load_recipe

    root = Path(__file__).resolve().parent.parent
    plain = load_recipe(root / "recipes" / "quickstart.yaml")
    assert "codes" not in plain.distill.hash_dict()
    assert "codes" not in str(plain.distill.hash_dict().get("weights", {}))
    on = load_recipe(root / "recipes" / "quickstart.yaml", ["distill.weights.codes=1"])
    assert on.distill.hash_dict()["weights"]["codes"] == 1.0
    changed = load_recipe(root / "recipes" / "quickstart.yaml", ["distill.codes.levels=2"])
    assert "codes" in changed.distill.hash_dict()
    assert math.isclose(on.distill.weights["codes"], 1.0)


class _MaskingTeacher(torch.nn.Module):
    """Four tokens a record; the last one missing in odd records."""

    def forward(self, signal: torch.Tensor) -> ECGModelOutput:
        b = signal.shape[0]
        mask = torch.ones(b, 4, dtype=torch.bool)
        mask[signal[:, 0, 0] > 0, 3] = False
        return ECGModelOutput(logits=signal[:, :2, 0], tokens=signal[:, :4, :3],
                              token_leads=torch.arange(4), pooled=signal[:, 0, :3],
                              token_mask=mask)


def test_the_cache_keeps_the_teachers_token_mask(tmp_path) -> None:
    """A teacher that masks tokens (missing leads) gives the same mask from the cache as live,
    so the feature losses skip the same tokens either way."""
    records = _Records(6)
    teacher = _MaskingTeacher()
    cache = teacher_outputs(teacher, records, lambda b: {"signal": b["teacher"]}, key="m",
                            cache_dir=tmp_path, batch_size=4, progress=False)
    assert cache.token_mask.dtype == np.bool_ and cache.token_mask.shape == (6, 4)
    batch = {name: torch.from_numpy(np.array(a[:5])) for name, a in cache.extras().items()}
    rebuilt = cached_teacher_output(batch, cache.token_leads)
    assert torch.equal(rebuilt.token_mask, teacher(records.x[:5]).token_mask)
    assert not rebuilt.token_mask.all()


def test_the_codes_term_refuses_a_teacher_without_codes(tmp_path) -> None:
    from distill.core.errors import RecipeError
    from distill.engine.jobs import set_code_levels
    from distill.recipe import load_recipe

    root = Path(__file__).resolve().parent.parent
    signal_teacher = teachers.create("signal", num_labels=2, sampling_rate=100)
    on = load_recipe(root / "recipes" / "quickstart.yaml", ["distill.weights.codes=1"])
    with pytest.raises(RecipeError, match=r"^distill\.weights\.codes: the codes term needs a "
                                          r"tokenized teacher"):
        set_code_levels(signal_teacher, on)
    ablation = load_recipe(root / "recipes" / "quickstart.yaml", ["ablations.runs=[with_codes]"])
    with pytest.raises(RecipeError, match=r"^ablations\.runs \(with_codes\)"):
        set_code_levels(signal_teacher, ablation)
    set_code_levels(signal_teacher, load_recipe(root / "recipes" / "quickstart.yaml"))
    assert signal_teacher.code_levels == 0
    hypnos = teachers.create("foundation", _hypnos_folder(tmp_path), num_labels=2,
                             train_mode="frozen")
    set_code_levels(hypnos, load_recipe(root / "recipes" / "quickstart.yaml", [
        "distill.weights.codes=1", "distill.codes.levels=2"]))
    assert hypnos.code_levels == 2
