"""How hard is the synthetic PTB-XL? Train a small 1-D CNN and report macro AUROC.

The superdiagnostic task (NORM, MI, STTC, CD, HYP via ``diagnostic_class``; any listed code
counts whatever its likelihood), folds 1-8 train, fold 10 test, a global mean/std from the
training folds. The generator is calibrated so this lands at roughly 0.88-0.92: hard enough
that better models and distillation make a visible difference, easy enough to learn fast.

    python benchmarks/synth_difficulty.py --records 2000 --seed 0 --epochs 20
    python benchmarks/synth_difficulty.py --folder /path/to/ptbxl   # a written data set
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from distill.data import synth_physiology
from distill.data.dataset import ECGData, load_ptbxl
from distill.data.synth import generate_ptbxl


class SmallCNN(nn.Module):
    """Four conv blocks (conv-BN-ReLU-pool) and global average + max pooling."""

    def __init__(self, n_out: int = 5, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 12
        for c_out, k in ((width, 7), (width, 5), (2 * width, 5), (2 * width, 3)):
            layers += [nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.BatchNorm1d(c_out), nn.ReLU(), nn.MaxPool1d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 12, T] -> logits [B, n_out]."""
        h = self.features(x)
        return self.head(torch.cat([h.mean(-1), h.amax(-1)], 1))


def train_and_score(data: ECGData, epochs: int, seed: int, *,
                    model: nn.Module | None = None, signals: np.ndarray | None = None) -> dict:
    """Train on the training folds and return per-class and macro AUROC on the test folds
    (and the macro AUROC on the validation folds, ``val_macro_auc``).

    ``data`` comes from the project's loader, so labels, folds and the train-only scaler
    are exactly what every model in ecg-distill sees.

    Args:
        model: the network (default :class:`SmallCNN`); one whose output has ``logits``
            (an ecg-distill student) is called as ``model(signal=x)``.
        signals: [N, 12, T] mV to train on instead of ``data.signals`` (a reduced copy);
            the training folds' scaler is applied to them.
    """
    torch.manual_seed(seed)
    train_idx, test_idx = data.splits["train"], data.splits["test"]
    raw = np.asarray(data.signals if signals is None else signals)
    x = torch.from_numpy(data.scaler.apply(raw, range(12)).astype(np.float32))  # (N, 12, T)
    y = torch.from_numpy(data.labels)
    model = SmallCNN(n_out=len(data.classes)) if model is None else model

    def logits(batch: torch.Tensor) -> torch.Tensor:
        out = model(batch) if isinstance(model, SmallCNN) else model(signal=batch)
        return getattr(out, "logits", out)

    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(train_idx) // 64 + 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        for batch in np.array_split(gen.permutation(train_idx), len(train_idx) // 64 + 1):
            opt.zero_grad()
            loss_fn(logits(x[batch]), y[batch]).backward()
            opt.step()
            sched.step()
    model.eval()

    def scores(idx: np.ndarray) -> dict[str, float]:
        with torch.no_grad():
            prob = torch.sigmoid(logits(x[idx])).numpy()
        truth = data.labels[idx]
        return {c: float(roc_auc_score(truth[:, k], prob[:, k]))
                for k, c in enumerate(data.classes)}

    per_class = scores(test_idx)
    out = {"macro_auc": float(np.mean(list(per_class.values()))), "per_class": per_class}
    if len(data.splits.get("val", [])):
        out["val_macro_auc"] = float(np.mean(list(scores(data.splits["val"]).values())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--folder", type=Path, help="read a written PTB-XL-layout folder instead")
    ap.add_argument("--effect-scale", type=float, default=synth_physiology.EFFECT_SCALE,
                    help="pathology effect-size multiplier (calibration experiments)")
    ap.add_argument("--noise-scale", type=float, default=synth_physiology.NOISE_SCALE)
    args = ap.parse_args()
    synth_physiology.EFFECT_SCALE = args.effect_scale
    synth_physiology.NOISE_SCALE = args.noise_scale
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "synthetic"
            generate_ptbxl(folder, args.records, seed=args.seed, sampling_rates=(100,),
                           progress=False)
        data = load_ptbxl(folder, task="superdiagnostic", sampling_rate=100,
                          cache_dir=Path(tmp) / "cache", progress=False)
        t1 = time.perf_counter()
        res = train_and_score(data, args.epochs, args.seed)
    t2 = time.perf_counter()
    prevalence = data.labels.mean(axis=0)
    print(f"records {len(data)}  prevalence "
          + " ".join(f"{c}={p:.2f}" for c, p in zip(data.classes, prevalence)))
    print("test-fold AUROC " + " ".join(f"{c}={v:.3f}" for c, v in res["per_class"].items()))
    print(f"macro AUROC {res['macro_auc']:.4f}  (data {t1 - t0:.1f}s, training {t2 - t1:.1f}s)")


if __name__ == "__main__":
    main()
