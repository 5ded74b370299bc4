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
import ast
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from distill.data import synth_physiology
from distill.data.synth import DIAGNOSTIC_CLASS, SUPERCLASSES, synthesize


def load_folder(folder: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """Read a PTB-XL-layout folder at 100 Hz with wfdb.

    Returns:
        ([N, 12, 1000] float32 mV, database DataFrame indexed by ecg_id).
    """
    import wfdb

    meta = pd.read_csv(folder / "ptbxl_database.csv", index_col="ecg_id")
    x = np.stack([wfdb.rdrecord(str(folder / f)).p_signal.T.astype(np.float32) for f in meta["filename_lr"]])
    return x, meta


def superdiagnostic(meta: pd.DataFrame) -> np.ndarray:
    """Multi-hot [N, 5] superclass targets from the scp_codes column."""
    y = np.zeros((len(meta), len(SUPERCLASSES)), dtype=np.float32)
    for i, codes in enumerate(meta["scp_codes"]):
        for code in ast.literal_eval(codes):
            if code in DIAGNOSTIC_CLASS:
                y[i, SUPERCLASSES.index(DIAGNOSTIC_CLASS[code])] = 1.0
    return y


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


def train_and_score(x: np.ndarray, y: np.ndarray, folds: np.ndarray, epochs: int, seed: int) -> dict:
    """Train on folds 1-8 and return per-class and macro AUROC on fold 10."""
    torch.manual_seed(seed)
    train, test = folds <= 8, folds == 10
    mean, std = float(x[train].mean()), float(x[train].std())
    xt = torch.from_numpy((x - mean) / std)
    yt = torch.from_numpy(y)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (int(train.sum()) // 64 + 1))
    loss_fn = nn.BCEWithLogitsLoss()
    idx = np.flatnonzero(train)
    gen = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        for batch in np.array_split(gen.permutation(idx), len(idx) // 64 + 1):
            opt.zero_grad()
            loss_fn(model(xt[batch]), yt[batch]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        prob = torch.sigmoid(model(xt[np.flatnonzero(test)])).numpy()
    per_class = {c: float(roc_auc_score(y[test, k], prob[:, k])) for k, c in enumerate(SUPERCLASSES)}
    return {"macro_auc": float(np.mean(list(per_class.values()))), "per_class": per_class}


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
    x, meta = load_folder(args.folder) if args.folder else synthesize(args.records, seed=args.seed, fs=100)
    t1 = time.perf_counter()
    y = superdiagnostic(meta)
    res = train_and_score(x, y, meta["strat_fold"].to_numpy(), args.epochs, args.seed)
    t2 = time.perf_counter()
    print(f"records {len(x)}  prevalence " + " ".join(f"{c}={y[:, k].mean():.2f}" for k, c in enumerate(SUPERCLASSES)))
    print("fold-10 AUROC " + " ".join(f"{c}={v:.3f}" for c, v in res["per_class"].items()))
    print(f"macro AUROC {res['macro_auc']:.4f}  (data {t1 - t0:.1f}s, training {t2 - t1:.1f}s)")


if __name__ == "__main__":
    main()
