"""Self-supervised pretraining of a foundation-model family (``ecg-distill pretrain``).

The recipe's ``pretrain`` section names the family, size, options and any extra records;
the data section's training folds (labels never read) and the extra records train. What is
learned, and what picks the best epoch on the validation fold, depends on the family:

- csfm, lamae: masked modelling; the reconstruction error of the hidden patches (one fixed
  mask per record);
- rvq: the RVQ tokenizer; trained on reconstruction MSE plus commitment loss, the best
  epoch by the reconstruction MSE from all K codebooks;
- hypnos: next-token prediction over a trained tokenizer's codes (``pretrain.tokenizer``);
  the cross-entropy of the codes.
 Training is :func:`distill.engine.train.fit`: the same Accelerate loop, checkpoints,
exact resume and progress output as every other job.

Written under ``<run>/pretrain/``: ``best/`` (the pretraining model, encoder + decoder:
``AutoModel.from_pretrained`` of it gives the encoder alone, ``AutoModelForPreTraining``
the whole), ``checkpoints/``, ``metrics.json``, ``log.csv`` and ``pretrain.json`` (the
summary).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from distill.core.errors import ECGDistillError
from distill.core.hashing import stable_hash
from distill.core.io import atomic_write_text, require_safetensors
from distill.core.progress import progress_bar
from distill.data.dataset import ECGData, ECGSplit, SignalView
from distill.data.load import load_data
from distill.data.transfer import MixedSet, load_transfer
from distill.engine.accel import process_state
from distill.engine.jobs import augmentation, local_weights, normalization, train_settings
from distill.engine.train import EvalResult, TrainJob, fit
from distill.recipe import Recipe
from distill.models.hypnos import HypnosForNextToken, tokenizer_fields
from distill.models.masked import ECGForMaskedModeling, record_generators
from distill.models.rvq import RVQTokenizer, RVQTokenizerConfig
from students._masked import masked_families, pretraining_model

PRETRAIN_DIR = "pretrain"
SUMMARY = "pretrain.json"
VIEW = {"signal": SignalView()}  # every lead at the data's rate
MASK_SEED = 0  # the fixed validation/test masks: one per record index
EXTRA_STREAM = 1_000_003  # seed offset of the extra records' augmentation draws


def pretrain_folder(recipe: Recipe) -> Path:
    return recipe.run_dir / PRETRAIN_DIR


def build_model(recipe: Recipe, data: ECGData) -> nn.Module:
    """The recipe's pretraining model for ``data``'s rate and record length (random; a
    hypnos model over the recipe's trained tokenizer)."""
    p = recipe.pretrain
    fields = {**p.options, "sampling_rate": data.sampling_rate,
              "input_samples": int(data.store.shape[-1])}
    if p.family in masked_families():
        fields.update(mask_ratio=p.mask.ratio, mask_block=p.mask.block)
        if p.mask.strategy is not None:  # else the family's own default
            fields["mask_strategy"] = p.mask.strategy
    tokenizer = None
    if p.family == "hypnos":
        tokenizer = load_tokenizer(p.tokenizer, data)
        fields["rvq"] = tokenizer_fields(tokenizer.config)
    try:
        model = pretraining_model(p.family, p.size, **fields)
    except ValueError as exc:
        raise ECGDistillError(f"pretrain.options: {exc}") from None
    if tokenizer is not None:
        model.encoder.tokenizer.load_state_dict(tokenizer.state_dict())
    model.config.normalization = normalization(data)
    return model


def load_tokenizer(folder: str | Path, data: ECGData) -> RVQTokenizer:
    """A trained RVQ tokenizer that reads ``data`` as this run scales it, else a one-line
    error naming the folder."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ECGDistillError(f"pretrain.tokenizer: {folder} holds no saved model; train one "
                              f"with `ecg-distill pretrain` (family rvq) first")
    require_safetensors(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ECGDistillError(f"pretrain.tokenizer: cannot read {folder}/config.json: "
                              f"{str(exc).splitlines()[0]}") from None
    if not isinstance(config, RVQTokenizerConfig):
        raise ECGDistillError(f"pretrain.tokenizer: {folder} is a {config.model_type} model, "
                              f"not an RVQ tokenizer")
    if int(config.sampling_rate) != int(data.sampling_rate):
        raise ECGDistillError(f"pretrain.tokenizer: {folder} reads {config.sampling_rate} Hz, "
                              f"the data is at {data.sampling_rate} Hz")
    if getattr(config, "normalization", None) != normalization(data):
        raise ECGDistillError(f"pretrain.tokenizer: {folder} was trained on data scaled "
                              f"otherwise than this run's (data.scaler and the training folds "
                              f"must be the same)")
    return RVQTokenizer.from_pretrained(folder, input_samples=int(data.store.shape[-1])).eval()


def reconstruction_error(model: ECGForMaskedModeling, dataset: Any, *, ratio: float | None = None,
                         strategy: str | None = None, batch_size: int = 64, seed: int = MASK_SEED,
                         accelerator: Any = None, progress: bool = False) -> dict[str, float]:
    """Mean squared error over the hidden patches of ``dataset`` (one fixed mask per record:
    the same for every model and epoch) and the same normalised by the hidden patches'
    variance (NMSE: 1 = predicting their mean).

    With ``accelerator`` the loader is the prepared one of a training loop (``dataset`` is
    then that loader) and every process's sums are added."""
    loader = dataset if isinstance(dataset, DataLoader) else DataLoader(dataset,
                                                                        batch_size=batch_size)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # sq err, sum, sum sq, count
    with torch.no_grad():
        for batch in progress_bar(loader, enabled=progress, desc="reconstruction", leave=False,
                                  unit="batch"):
            out = model(signal=batch["signal"].to(device),
                        generators=record_generators(batch["index"].cpu(), seed),
                        mask_ratio=ratio, mask_strategy=strategy)
            hidden = out.hidden[..., None].expand_as(out.target)
            target = out.target[hidden].double()
            err = (out.reconstruction[hidden].double() - target).pow(2)
            sums += torch.stack([err.sum(), target.sum(), target.pow(2).sum(),
                                 torch.tensor(float(target.numel()), dtype=torch.float64,
                                              device=device)])
    if accelerator is not None and accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    sq, s, s2, n = (float(v) for v in sums)
    mse = sq / max(n, 1.0)
    var = s2 / max(n, 1.0) - (s / max(n, 1.0)) ** 2
    return {"mse": mse, "nmse": mse / var if var > 0 else float("nan")}


def batch_mean(model: nn.Module, loader: DataLoader,
               term: Callable[[nn.Module, Mapping[str, Any], Any], tuple[torch.Tensor, float]],
               *, accelerator: Any = None, progress: bool = False) -> float:
    """A weighted mean over the batches of ``loader`` in eval mode, without gradient:
    ``term(model, batch, device)`` gives a batch's (sum, count); the result is the total sum
    over the total count (with ``accelerator``, every process's batches)."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # sum, count
    with torch.no_grad():
        for batch in progress_bar(loader, enabled=progress, desc="validation", leave=False,
                                  unit="batch"):
            total, count = term(model, batch, device)
            sums += torch.stack([total.double(), torch.tensor(float(count), dtype=torch.float64,
                                                              device=device)])
    if accelerator is not None and accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    return float(sums[0] / sums[1].clamp_min(1.0))


def mean_loss(model: nn.Module, loader: DataLoader, *, accelerator: Any = None,
              progress: bool = False) -> float:
    """The model's own loss averaged over the records of ``loader`` (eval mode; with
    ``accelerator``, every process's records)."""

    def term(m: nn.Module, batch: Mapping[str, Any], device: Any) -> tuple[torch.Tensor, float]:
        n = batch["signal"].shape[0]
        return m(signal=batch["signal"].to(device)).loss * n, n

    return batch_mean(model, loader, term, accelerator=accelerator, progress=progress)


def _validate(accelerator: Any, model: nn.Module, loader: DataLoader, progress: bool
              ) -> EvalResult:
    show = progress and accelerator.is_local_main_process
    if isinstance(accelerator.unwrap_model(model), ECGForMaskedModeling):
        loss = reconstruction_error(model, loader, accelerator=accelerator, progress=show)["mse"]
    else:
        loss = mean_loss(model, loader, accelerator=accelerator, progress=show)
    empty = np.zeros((0,))
    return EvalResult(loss=loss, macro_auc=float("nan"), label_auc=[], index=empty,
                      probs=empty, labels=empty, score=-loss)


def _parameter_counts(model: nn.Module) -> dict[str, int]:
    """What the summary reports of a pretraining model's size."""
    def count(m: nn.Module) -> int:
        return int(sum(t.numel() for t in m.parameters()))

    if isinstance(model, ECGForMaskedModeling):
        return {"encoder_parameters": count(model.encoder),
                "decoder_parameters": count(model.decoder)}
    if isinstance(model, HypnosForNextToken):
        return {"encoder_parameters": count(model.encoder) - count(model.encoder.tokenizer),
                "depth_parameters": count(model.depth),
                "tokenizer_parameters": count(model.encoder.tokenizer)}
    return {"parameters": count(model)}


def pretrain_sets(recipe: Recipe, data: ECGData, extra: ECGData | None
                  ) -> tuple[Any, ECGSplit]:
    """(training set: the training folds plus every extra record; validation fold)."""
    aug = augmentation(recipe)
    transform = aug if aug.active else None
    train: Any = data.split("train", VIEW, transform=transform, seed=recipe.seed)
    if extra is not None:  # its own augmentation stream; set_epoch reaches both parts
        every = np.arange(len(extra), dtype=np.int64)
        train = MixedSet([train, ECGSplit(extra, every, VIEW, transform=transform,
                                          seed=recipe.seed + EXTRA_STREAM)])
    return train, data.split("val", VIEW, seed=recipe.seed)


def pretrain_settings(recipe: Recipe) -> dict[str, Any]:
    """What the pretrained model depends on besides the data."""
    p = recipe.pretrain
    train = train_settings(recipe)
    train.update({k: v for k, v in (("epochs", p.epochs), ("lr", p.lr),
                                    ("batch_size", p.batch_size)) if v is not None})
    settings = {"seed": recipe.seed, "train": train,
                "pretrain": {k: v for k, v in dataclasses.asdict(p).items()
                             if k not in ("epochs", "lr", "batch_size")
                             and not (k == "tokenizer" and v is None)}}  # older runs' hashes
    if p.tokenizer is not None:  # a tokenizer re-trained in place is a new one
        settings["tokenizer_weights"] = local_weights(p.tokenizer)
    return settings


def pretrain_job(recipe: Recipe, data: ECGData, extra: ECGData | None) -> TrainJob:
    """The pretraining job of the recipe's family (labels never read)."""
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    process_state()  # before the model: the codebooks see whether they train distributed
    model = build_model(recipe, data)
    train, val = pretrain_sets(recipe, data, extra)

    def loss_fn(m: nn.Module, batch: Mapping[str, Any]):
        return m(signal=batch["signal"]).loss, {}

    def logits_fn(m: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        raise ECGDistillError("pretraining has no logits")  # validate is used instead

    p = recipe.pretrain
    return TrainJob(
        name=f"pretrain {p.family}/{p.size}", stage="", model=model, train_set=train,
        val_set=val, loss_fn=loss_fn, logits_fn=logits_fn,
        save_model=lambda m, f, sd: m.save_pretrained(f, state_dict=sd),
        fingerprint=stable_hash({"job": "pretrain", "data": data.fingerprint,
                                 "extra": None if extra is None else extra.fingerprint,
                                 **pretrain_settings(recipe)}),
        validate=_validate)


def run_pretrain(recipe: Recipe, *, resume: bool = False, force: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Pretrain the recipe's model; returns (and writes) the summary ``pretrain.json``.

    Raises:
        ECGDistillError: a finished pretraining of other settings in the folder (without
            ``force``), or checkpoints of an interrupted run without ``resume``.
    """
    out = pretrain_folder(recipe)
    summary_file = out / SUMMARY
    data = load_data(recipe.data, progress=progress)
    extra = load_transfer(recipe.data, recipe.pretrain.extra, data, progress=progress)
    job = pretrain_job(recipe, data, extra)
    if force and out.exists():  # only once the data and the model are known to load
        shutil.rmtree(out)
    if summary_file.exists():
        done = json.loads(summary_file.read_text())
        if done.get("fingerprint") == job.fingerprint:
            print(f"{out}: pretraining already complete (--force redoes it)")
            return done
        raise ECGDistillError(f"{out} holds a pretraining of other settings; --force deletes it "
                              f"and starts over")
    p = recipe.pretrain
    cfg = dataclasses.replace(recipe.train, batch_size=p.batch_size or recipe.train.batch_size)
    result = fit(job, cfg, out, seed=recipe.seed, resume=resume, progress=progress,
                 epochs=p.epochs, lr=p.lr)
    summary = {
        "family": p.family, "size": p.size, "fingerprint": job.fingerprint,
        **_parameter_counts(job.model),
        "options": dict(p.options),
        "records": {"train": len(job.train_set), "val": len(job.val_set)},
        "best_epoch": result.metrics["best_epoch"],
        "best_val_loss": -result.metrics["best_val_macro_auc"]
        if result.metrics["best_val_macro_auc"] is not None else None,
        "seconds": result.metrics["seconds_this_session"],
        "model": str(result.best_folder),
    }
    if p.family in masked_families():
        summary["mask"] = dataclasses.asdict(p.mask)
    if p.tokenizer is not None:
        summary["tokenizer"] = p.tokenizer
    if process_state().is_main_process:
        atomic_write_text(summary_file, json.dumps(summary, indent=1))
    return summary

