"""Sizes and costs: parameter and MAC counts against hand formulas; the models command."""

from __future__ import annotations

import torch
from torch import nn

import students
from distill.cli import main
from distill.metrics.footprint import count_macs, count_parameters, linear_share, signal_batch


class _Toy(nn.Module):
    input_names = ("signal",)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(12, 8, kernel_size=5, padding=2)
        self.fc = nn.Linear(8 * 100, 3)
        self.tied = self.fc  # a shared module is counted once

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(signal).flatten(1))  # (B, 3)


def test_counts_match_hand_formulas() -> None:
    model = _Toy()
    conv_params = 12 * 8 * 5 + 8
    fc_params = 800 * 3 + 3
    assert count_parameters(model) == conv_params + fc_params
    model.conv.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == fc_params
    assert linear_share(model) == 800 * 3 / (conv_params + fc_params)
    batch = {"signal": torch.randn(4, 12, 100)}
    # per record: conv 12*8*5 MACs at each of 100 positions, then an 800x3 product
    assert count_macs(model, batch) == 12 * 8 * 5 * 100 + 800 * 3


def test_models_command_lists_every_preset(capsys) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "students (12 leads at 100 Hz, 10-second record, 5 labels)"
    rows = [line.split() for line in lines[2:-1]]
    assert [(r[0], r[1]) for r in rows] == students.presets()
    assert {r[0]: r[-1] for r in rows}["llava"] == "printout"
    assert {r[0]: r[-1] for r in rows}["xresnet1d"] == "signal"
    for family, size, params, *_ in rows:
        exact = count_parameters(students.create(family, size, num_labels=5))
        value, unit = float(params[:-1]), params[-1]
        assert abs(value * {"k": 1e3, "M": 1e6}[unit] - exact) <= 0.01 * exact


def test_macs_scale_with_record_length() -> None:
    """Halving the rate halves a conv net's MACs (to within the stem's rounding)."""
    m100 = students.create("xresnet1d", "tiny", num_labels=5, sampling_rate=100)
    m50 = students.create("xresnet1d", "tiny", num_labels=5, sampling_rate=50)
    full = count_macs(m100, signal_batch(1, sampling_rate=100))
    half = count_macs(m50, signal_batch(1, sampling_rate=50))
    assert 0.45 < half / full < 0.55
