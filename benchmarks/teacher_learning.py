"""How fast a VLM teacher learns the synthetic task from scratch, by tower and readout.

Trains a freshly initialised LLaVA (the ``ecg-vlm-small-init`` architecture with a chosen
vision tower) for a fixed number of steps on the rendered records of a recipe's training
folds, then prints the validation macro AUC on the first ``--val`` records of the
validation fold. Readouts: ``llava`` (the adapter's head on the language model's last
position, what a teacher trains) or ``tower-mean`` (a linear head on the mean of the
projected visual tokens, skipping the language model), to tell the tower from what the
LLaVA path adds around it.

    python benchmarks/teacher_learning.py --tower swin --lr 3e-4 --steps 120
    python benchmarks/teacher_learning.py --tower conv --subset 1600 --batch 64 --lr 2e-3 --steps 300

The recipe's data (``recipes/teacher-zoo/ecg-vlm-small.yaml``: 40,000 records) is generated,
decoded and rendered on first use (about 5 minutes here) and cached.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def vision_config(tower: str, layers: int = 2, depths: list[int] | None = None):
    """The vision tower of the experiment (token stride 16 at 224 px, no CLS token)."""
    if tower == "swin":
        from transformers import SwinConfig

        return SwinConfig(image_size=224, patch_size=8, embed_dim=96, depths=[2, 8],
                          num_heads=[3, 6], window_size=7, mlp_ratio=2.0, drop_path_rate=0.0)
    from teachers.conv_tower import EcgConvTowerConfig

    return EcgConvTowerConfig(num_hidden_layers=layers, depths=depths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(REPO / "recipes/teacher-zoo/ecg-vlm-small.yaml"))
    p.add_argument("--tower", choices=["swin", "conv"], default="swin")
    p.add_argument("--tower-layers", type=int, default=2,
                   help="conv tower: transformer layers after the convolutions (default 2)")
    p.add_argument("--tower-depths", type=int, nargs=4, default=None, metavar="N",
                   help="conv tower: 3x3 convolutions after each stage's stride-2 one (default 1 1 1 1)")
    p.add_argument("--readout", choices=["llava", "tower-mean"], default="llava")
    p.add_argument("--pool", choices=["last", "image-mean"], default="last",
                   help="llava readout: the head reads the last prompt position or the mean "
                        "over the image positions (the adapter's pool setting)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--input", choices=["processor", "ink"], default="processor",
                   help="pixels as the processor normalises them, or ink = 1 - grey level "
                        "(paper 0, trace 1) in every channel")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--subset", type=int, default=0, help="train on this many records (0: all)")
    p.add_argument("--val", type=int, default=400, help="validation records scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. data.synthetic.records=2000")
    args = p.parse_args(argv)

    import teachers
    from distill.metrics.classification import macro_auc
    from distill.engine.jobs import load_job_data
    from distill.recipe import load_recipe
    from teachers.tiny import PRINTOUT_MEAN, PRINTOUT_STD, _write_tiny_llava
    from transformers import get_cosine_schedule_with_warmup

    jd = load_job_data(load_recipe(args.recipe, args.overrides), progress=True)
    folder = Path(tempfile.mkdtemp(prefix="teacher-learning-"))
    _write_tiny_llava(folder, vision_config(args.tower, args.tower_layers, args.tower_depths), image_size=224, token_stride=16,
                      strategy="full", extra_tokens=0, text_width=256, text_layers=2,
                      image_mean=PRINTOUT_MEAN, image_std=PRINTOUT_STD)
    torch.manual_seed(args.seed)
    model = teachers.create("vlm", str(folder), num_labels=len(jd.classes),
                            id2label=dict(enumerate(jd.classes)), image_size=224, pool=args.pool)
    body = model.hf_model.base_model
    mean_head = torch.nn.Linear(model.head.in_features, len(jd.classes))
    model.to(args.device)
    mean_head.to(args.device)

    if args.input == "ink":  # what the image CNN read: grey level inverted

        def ink(image: torch.Tensor) -> torch.Tensor:
            grey = image.float().mean(1, keepdim=True) / 255.0  # (B, 1, H, W)
            return (1.0 - grey).expand(-1, 3, -1, -1)

        model.pixel_values = ink  # the adapter's forward reads its images through this

    def logits(images: torch.Tensor) -> torch.Tensor:
        if args.readout == "llava":
            return model(image=images).logits
        tokens = body.vision_tower(model.pixel_values(images)).last_hidden_state
        return mean_head(body.multi_modal_projector(tokens).mean(1))

    params = [p for p in model.parameters() if p.requires_grad] + list(mean_head.parameters())
    opt = torch.optim.AdamW(params, args.lr, weight_decay=0.05)
    sched = get_cosine_schedule_with_warmup(opt, int(0.05 * args.steps), args.steps)
    rng = np.random.default_rng(args.seed)
    train = np.asarray(jd.data.splits["train"])
    if args.subset:
        train = np.sort(rng.choice(train, args.subset, replace=False))
    labels = torch.from_numpy(np.asarray(jd.data.labels)).float().to(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        idx = np.sort(rng.choice(train, args.batch, replace=False))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits(torch.from_numpy(np.array(jd.images[idx])).to(args.device)), labels[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    model.eval()
    val = np.asarray(jd.data.splits["val"])[:args.val]
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(logits(torch.from_numpy(np.array(jd.images[val[s:s + 50]]))
                                                .to(args.device))).cpu()
                           for s in range(0, len(val), 50)]).numpy()
    n_params = sum(p.numel() for p in model.parameters())
    shape = '' if args.tower == 'swin' else f' ({args.tower_layers} layers, depths {args.tower_depths or [1] * 4})'
    readout = args.readout if args.readout == "tower-mean" else f"llava/{args.pool}"
    print(f"tower {args.tower}{shape} ({n_params / 1e6:.2f}M), readout {readout}, {args.device}, input "
          f"{args.input}, lr {args.lr}, "
          f"batch {args.batch}, {args.steps} steps over {len(train)} records: "
          f"{args.steps * args.batch / seconds:.1f} images/s, validation macro AUC "
          f"{macro_auc(np.asarray(jd.data.labels)[val], probs):.4f} ({len(val)} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
