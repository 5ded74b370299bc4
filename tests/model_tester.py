"""One shared tester for every teacher and student: a table of cases, the same checks.

A test module lists ``ModelCase`` rows and subclasses ``ModelTester`` under
``@pytest.mark.parametrize("case", CASES, ids=case_id)``; every check below then runs on
every row (timm-style registry-wide tests).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.core.contract import ECGModelOutput, check_output, model_inputs

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ModelCase:
    """One model configuration under test.

    Args:
        name: test id.
        build: tmp folder -> the model (random weights, eval mode not required).
        make_batch: batch size -> batch dict (``signal``, ``image``, ``labels`` ...).
        num_labels: C.
        save: (model, folder) -> None; writes what ``reload_code`` reads.
        reload_code: Python source run in a fresh interpreter with ``folder`` (a str) bound;
            it must bind ``model``. Empty = no save/reload check for this case.
        trainable: model -> names of parameters that must train (None = every parameter
            with requires_grad).
        expect_lead_tokens: True when every token belongs to one lead (no -1).
    """

    name: str
    build: Callable[[Path], nn.Module]
    make_batch: Callable[[int], dict[str, torch.Tensor]]
    num_labels: int
    save: Callable[[nn.Module, Path], None] | None = None
    reload_code: str = ""
    trainable: Callable[[nn.Module], set[str]] | None = None
    expect_lead_tokens: bool = False
    tolerance: float = 1e-5


def case_id(case: ModelCase) -> str:
    return case.name


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> ECGModelOutput:
    return model(**model_inputs(model, batch))


class ModelTester:
    """Contract checks shared by every model; ``case`` comes from the parametrize table."""

    def test_output_contract(self, case: ModelCase, tmp_path: Path) -> None:
        model = case.build(tmp_path).eval()
        batch = case.make_batch(3)
        with torch.no_grad():
            out = forward(model, batch)
        assert isinstance(out, ECGModelOutput)
        check_output(out, batch_size=3, num_labels=case.num_labels, where=case.name)
        assert out.logits.dtype == torch.float32 and out.tokens.dtype == torch.float32
        if case.expect_lead_tokens:
            assert (out.token_leads >= 0).all(), "every token should carry its lead"

    def test_backward_reaches_every_trainable_parameter(self, case: ModelCase,
                                                        tmp_path: Path) -> None:
        model = case.build(tmp_path).train()
        batch = case.make_batch(4)
        out = forward(model, batch)
        # every output the losses use must carry gradient to the weights
        loss = (nn.functional.binary_cross_entropy_with_logits(out.logits, batch["labels"])
                + out.tokens.pow(2).mean() + out.pooled.pow(2).mean())
        loss.backward()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if case.trainable is not None:
            assert trainable == case.trainable(model), "unexpected set of trainable parameters"
        assert trainable, "nothing trains"
        missing = sorted(n for n, p in model.named_parameters()
                         if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0))
        assert not missing, f"no gradient for {missing[:5]} ({len(missing)} in all)"
        bad = [n for n, p in model.named_parameters()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"NaN/inf gradient in {bad[:5]}"

    def test_records_are_independent_in_eval(self, case: ModelCase, tmp_path: Path) -> None:
        """A record's output does not depend on the other records in its batch."""
        model = case.build(tmp_path).eval()
        batch = case.make_batch(4)
        with torch.no_grad():
            full = forward(model, batch)
            first = forward(model, {k: v[:1] for k, v in batch.items()})
        torch.testing.assert_close(first.logits, full.logits[:1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(first.pooled, full.pooled[:1], rtol=1e-4, atol=1e-4)

    def test_save_and_reload_in_fresh_process(self, case: ModelCase, tmp_path: Path) -> None:
        if case.save is None or not case.reload_code:
            pytest.skip("no fresh-process reload for this case (covered by a sibling case)")
        model = case.build(tmp_path).eval()
        folder = tmp_path / "saved"
        case.save(model, folder)
        batch = case.make_batch(2)
        torch.save(batch, tmp_path / "batch.pt")
        with torch.no_grad():
            expected = forward(model, batch)
        script = textwrap.dedent(f"""
            import sys, torch
            sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
            from model_tester import forward
            folder = {str(folder)!r}
        """) + textwrap.dedent(case.reload_code) + textwrap.dedent(f"""
            model.eval()
            batch = torch.load({str(tmp_path / 'batch.pt')!r})
            with torch.no_grad():
                out = forward(model, batch)
            torch.save({{k: out[k] for k in ("logits", "tokens", "pooled", "token_leads")}},
                       {str(tmp_path / 'out.pt')!r})
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = torch.load(tmp_path / "out.pt")
        for key in ("logits", "tokens", "pooled"):
            torch.testing.assert_close(got[key], expected[key], rtol=case.tolerance,
                                       atol=case.tolerance)
        assert torch.equal(got["token_leads"], expected["token_leads"])
