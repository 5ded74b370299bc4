"""A deterministic toy teacher and record set for the teacher-cache shard tests (shared by
tests/test_cache_shards.py and its 2-process worker)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from distill.core.contract import ECGModelOutput

N, BATCH, KEY = 23, 4, "shards"  # 6 batches, the last one short


class Records(Dataset):
    def __init__(self, n: int = N, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, generator=g) * scale

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"index": i, "x": self.x[i]}


class Teacher(torch.nn.Module):
    """Tokens from a fixed random projection (values that need more than fp16's precision),
    a token mask and logits."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.proj = torch.nn.Parameter(torch.randn(16, 8, generator=g), requires_grad=False)

    def forward(self, signal: torch.Tensor) -> ECGModelOutput:
        tokens = torch.tanh(signal @ self.proj) * 3.0 + signal.mean() * 1e-3
        mask = torch.ones(signal.shape[0], 3, dtype=torch.bool)
        mask[signal[:, 0, 0] > 0.5, 2] = False
        return ECGModelOutput(logits=tokens.mean(1)[:, :2], tokens=tokens,
                              pooled=tokens.mean(1), token_leads=torch.arange(3),
                              token_mask=mask)
