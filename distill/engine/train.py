"""The one training loop (accelerate's canonical loop) for teachers, baselines and students.

A :class:`TrainJob` says what trains and how a batch becomes a loss and logits; :func:`fit`
does the rest, identically for teacher fine-tuning, label-only baselines and distillation:

* model, optimiser, data loaders and scheduler prepared by Accelerate (one CPU, several
  processes, several GPUs, FSDP: whatever ``accelerate launch`` configured);
* AdamW (no weight decay on biases and norms) with linear warm-up and cosine decay over
  the optimiser steps, gradient accumulation (``accelerator.accumulate``), gradient
  clipping, mixed precision (``no``, ``bf16``, ``fp16`` on a GPU);
* evaluation after every epoch with ``gather_for_metrics`` (every validation record counted
  once, whatever the process count), the best model by validation macro AUC saved under
  ``best/``, early stopping after ``early_stopping`` epochs without improvement;
* ``save_state`` after every epoch (and every ``checkpoint_every`` optimiser steps) into
  an atomically renamed folder (:mod:`distill.engine.checkpoint`); ``resume=True`` restores the
  newest verified checkpoint and skips the batches it had seen (``skip_first_batches``),
  so an interrupted run ends with the same parameters, optimiser state and metrics as an
  uninterrupted one;
* one seed for everything (``accelerate.utils.set_seed``, a seedable sampler, a dedicated
  loader generator, augmentation draws keyed by (seed, epoch, record)).

Written under ``out_dir``: ``best/`` (the model, ``val_predictions.npz``),
``checkpoints/``, ``metrics.json``, ``log.csv`` (one row per epoch) and TensorBoard logs
under ``tensorboard/`` when tensorboard is installed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import get_cosine_schedule_with_warmup

from distill.engine import checkpoint as ckpt
from distill.core.errors import ECGDistillError
from distill.metrics.classification import label_aucs, macro_auc
from distill.core.io import atomic_dir, atomic_write_text, stale_temporaries
from distill.core.progress import progress_bar
from distill.engine.accel import machine_description, make_accelerator, process_state  # noqa: F401
from distill.recipe import TrainConfig

LossFn = Callable[[nn.Module, Mapping[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
LogitsFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


@dataclass
class TrainJob:
    """What one training run trains.

    Attributes:
        name: shown in progress bars and logs ("teacher", "distill xresnet1d/tiny").
        model: the module whose parameters train (for distillation: student + objective).
        train_set, val_set: datasets of batch dicts holding at least ``labels`` and ``index``.
        loss_fn: (prepared model, batch) -> (loss, named terms to log).
        logits_fn: (prepared model, batch) -> logits [B, C] for evaluation.
        save_model: (unwrapped model, folder, full state dict or None) -> writes the
            deployable model; the state dict is given when the parameters are sharded
            (FSDP, DeepSpeed) and must be what is written.
        fingerprint: identifies the job's settings; a checkpoint of another is refused.
        on_device: called with the accelerator's device before training (e.g. to move a
            live teacher that is not trained, hence not prepared).
        class_names: label names for per-label metrics.
        stage: the ``run`` stage that trains it (named in messages about ``--force``);
            empty for a command of its own whose ``--force`` is a plain flag (pretrain).
        validate: (accelerator, prepared model, validation loader, progress) ->
            :class:`EvalResult`, for a job not scored by macro AUC (masked pretraining:
            its reconstruction error); None = :func:`evaluate` with ``logits_fn``.
    """

    name: str
    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    loss_fn: LossFn
    logits_fn: LogitsFn
    save_model: Callable[[nn.Module, Path, dict[str, torch.Tensor] | None], None]
    fingerprint: str = ""
    on_device: Callable[[torch.device], None] | None = None
    class_names: list[str] = field(default_factory=list)
    stage: str = "train"
    validate: Callable[[Any, nn.Module, DataLoader, bool], EvalResult] | None = None


@dataclass
class EvalResult:
    """Validation metrics of one pass (identical on every process)."""

    loss: float
    macro_auc: float
    label_auc: list[float]
    index: np.ndarray  # (N,) record positions seen, each once
    probs: np.ndarray  # (N, C)
    labels: np.ndarray  # (N, C)
    score: float | None = None  # what the best epoch maximises, when not the macro AUC

    @property
    def monitored(self) -> float:
        """The value the best model maximises: ``score`` if given, else the macro AUC."""
        return self.macro_auc if self.score is None else self.score


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices, none on biases, norms and other vectors."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ECGDistillError("nothing to train: the model has no trainable parameter")
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _loader(dataset: Dataset, cfg: TrainConfig, train: bool, seed: int,
            processes: int = 1) -> DataLoader:
    """Training: shuffled, and the incomplete last batch dropped (a batch of one record
    cannot train BatchNorm; a different record is left out each epoch) unless the set holds
    less than one batch per process. Evaluation: every record, in order."""
    # a dedicated generator: creating an iterator (e.g. after a resume) never draws from
    # the global RNG, so dropout and other draws continue exactly as without the break
    gen = torch.Generator().manual_seed(seed)
    drop_last = train and len(dataset) >= cfg.batch_size * processes
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train, drop_last=drop_last,
                      num_workers=cfg.num_workers, generator=gen, persistent_workers=False)


def evaluate(accelerator, model: nn.Module, loader: DataLoader, logits_fn: LogitsFn,
             progress: bool = False, desc: str = "validation") -> EvalResult:
    """One pass over ``loader`` with every process's predictions gathered.

    ``gather_for_metrics`` drops the samples Accelerate repeated to even out the last
    batch, so each record appears exactly once in the result.
    """
    model.eval()
    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    bar = progress_bar(loader, enabled=progress and accelerator.is_local_main_process,
                       desc=desc, leave=False, unit="batch")
    with torch.no_grad():
        for batch in bar:
            with accelerator.autocast():
                logits = logits_fn(model, batch).float()  # (B, C)
            chunks.append(accelerator.gather_for_metrics(
                (logits, batch["labels"].float(), batch["index"])))
    logits = torch.cat([c[0] for c in chunks]).cpu()  # (N, C)
    labels = torch.cat([c[1] for c in chunks]).cpu()
    index = torch.cat([c[2] for c in chunks]).cpu().numpy()
    loss = nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    probs = torch.sigmoid(logits).numpy()
    aucs = label_aucs(labels.numpy(), probs)
    return EvalResult(loss=loss, macro_auc=macro_auc(labels.numpy(), probs),
                      label_auc=[float(a) for a in aucs], index=index, probs=probs,
                      labels=labels.numpy())


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class _Running:
    """Per-process sums of the training loss terms over the epoch in progress."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, terms: Mapping[str, torch.Tensor], n: int) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.count += n

    def load(self, state: Mapping[str, Any]) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])

    def gathered(self, accelerator) -> list[dict[str, Any]]:
        """Every process's sums (the same term names on each), process order."""
        keys = sorted(self.sums)
        local = torch.tensor([[self.sums[k] for k in keys] + [float(self.count)]],
                             dtype=torch.float64, device=accelerator.device)
        rows = accelerator.gather(local).cpu().tolist()  # (P, K + 1)
        return [{"sums": dict(zip(keys, r[:-1])), "count": int(r[-1])} for r in rows]

    def means(self, accelerator) -> dict[str, float]:
        """Means over every process's records so far."""
        keys = sorted(self.sums)
        local = torch.tensor([self.sums[k] for k in keys] + [float(self.count)],
                             dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(local, reduction="sum").cpu()
        n = max(float(total[-1]), 1.0)
        return {k: float(total[i]) / n for i, k in enumerate(keys)}


@dataclass
class FitResult:
    """What :func:`fit` returns (also written to ``metrics.json``)."""

    best_folder: Path
    metrics: dict[str, Any]


def fit(job: TrainJob, cfg: TrainConfig, out_dir: str | Path, *, seed: int = 0,
        resume: bool = False, progress: bool = True, epochs: int | None = None,
        lr: float | None = None,
        on_step: Callable[[int], None] | None = None) -> FitResult:
    """Train ``job`` under ``out_dir`` (see the module docstring).

    Args:
        job: what trains.
        cfg: the recipe's ``train`` section.
        out_dir: the job's folder.
        seed: the run's seed.
        resume: continue from the newest verified checkpoint in ``out_dir``; without it a
            folder that already holds checkpoints is refused (nothing is overwritten).
        progress: tqdm bars on the main process (``--quiet`` turns them off).
        epochs, lr: override ``cfg.epochs`` / ``cfg.lr`` (the teacher's own settings).
        on_step: called with the step count after every batch (profiling, tests).

    Returns:
        FitResult(best model folder, metrics).

    Raises:
        ECGDistillError: checkpoints present without ``resume``; a checkpoint of another
            job; fp16 on a CPU.
    """
    out_dir = Path(out_dir)
    epochs = epochs if epochs is not None else cfg.epochs
    lr = lr if lr is not None else cfg.lr
    accelerator = make_accelerator(cfg, out_dir, seed)
    found = _check_checkpoints(accelerator, out_dir, job, resume)
    set_seed(seed)
    loop = _Loop.prepare(job, cfg, accelerator, out_dir, seed=seed, epochs=epochs, lr=lr,
                         progress=progress)
    if resume and found:
        loop.state = _restore(accelerator, loop.root, job, loop.running)
    if accelerator.log_with:
        accelerator.init_trackers("tensorboard", config={**_flat(cfg), "job": job.name,
                                                         "lr": lr, "epochs": epochs})
    epoch_bar = progress_bar(total=epochs, initial=loop.state.epoch, desc=job.name,
                             unit="epoch", enabled=loop.bars)
    start_all = time.perf_counter()
    for epoch in range(loop.state.epoch, epochs):
        if loop.state.stopped_early:
            break
        seen, train_seconds = loop.train_epoch(epoch, on_step)
        loop.end_epoch(epoch, seen, train_seconds)
        epoch_bar.update(1)
    epoch_bar.close()
    seconds = time.perf_counter() - start_all
    metrics = _metrics(job, loop.state, accelerator, seconds)
    metrics["complete"] = True
    if accelerator.is_main_process:
        _write_logs(out_dir, job, loop.state, None, accelerator, finished=True, seconds=seconds)
    accelerator.wait_for_everyone()
    # not end_training(): it also destroys the process group, which the next job of the
    # same process (another student, the next stage) still needs
    for tracker in accelerator.trackers:
        tracker.finish()
    return FitResult(best_folder=loop.best_dir, metrics=metrics)


def _force(job: TrainJob) -> str:
    """The flag that starts a job over: ``--force STAGE`` of ``run``, or a plain ``--force``."""
    return f"--force {job.stage}" if job.stage else "--force"


def _check_checkpoints(accelerator, out_dir: Path, job: TrainJob, resume: bool) -> list[Path]:
    """The checkpoints already in ``out_dir``; refused without ``resume`` (nothing is
    overwritten). Half-written ones are removed."""
    root = out_dir / "checkpoints"
    found = ckpt.list_checkpoints(root)
    if found and not resume:
        if ckpt.peek_fingerprint(found[-1]) not in (None, job.fingerprint):
            raise ECGDistillError(f"{out_dir} holds a run with other settings; {_force(job)} "
                                  f"deletes it and starts over")
        raise ECGDistillError(f"{out_dir} holds checkpoints of an interrupted run; pass --resume "
                              f"to continue it, or {_force(job)} to start over")
    if accelerator.is_main_process:
        ckpt.clean_partial(root)
        for stale in stale_temporaries(out_dir / "best"):  # a save killed half-way
            shutil.rmtree(stale, ignore_errors=True)
    return found


@dataclass
class _Loop:
    """The prepared objects of one :func:`fit` and its epoch steps."""

    job: TrainJob
    cfg: TrainConfig
    accelerator: Any
    out_dir: Path
    epochs: int
    progress: bool
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_dl: DataLoader
    val_dl: DataLoader
    scheduler: Any
    state: ckpt.TrainerState
    running: _Running
    trainable: list[torch.nn.Parameter]

    @classmethod
    def prepare(cls, job: TrainJob, cfg: TrainConfig, accelerator, out_dir: Path, *, seed: int,
                epochs: int, lr: float, progress: bool) -> _Loop:
        """Model, AdamW, loaders and the warm-up + cosine schedule, prepared by Accelerate."""
        model = job.model
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr)
        train_dl = _loader(job.train_set, cfg, train=True, seed=seed,
                           processes=accelerator.num_processes)
        val_dl = _loader(job.val_set, cfg, train=False, seed=seed)
        model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl,
                                                                 val_dl)
        steps_per_epoch = math.ceil(len(train_dl) / cfg.grad_accum)
        total_steps = max(1, steps_per_epoch * epochs)
        scheduler = accelerator.prepare(get_cosine_schedule_with_warmup(
            optimizer, num_warmup_steps=round(cfg.warmup_ratio * total_steps),
            num_training_steps=total_steps))
        if job.on_device is not None:
            job.on_device(accelerator.device)
        return cls(job=job, cfg=cfg, accelerator=accelerator, out_dir=out_dir, epochs=epochs,
                   progress=progress, model=model, optimizer=optimizer, train_dl=train_dl,
                   val_dl=val_dl, scheduler=scheduler,
                   state=ckpt.TrainerState(fingerprint=job.fingerprint,
                                           processes=accelerator.num_processes),
                   running=_Running(),
                   trainable=[p for p in model.parameters() if p.requires_grad])

    @property
    def root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def best_dir(self) -> Path:
        return self.out_dir / "best"

    @property
    def bars(self) -> bool:
        return self.progress and self.accelerator.is_local_main_process

    def save_checkpoint(self) -> None:
        """``save_state`` of every process into a temporary folder, sealed (checksums,
        loop state) and renamed into place by the main process; old ones pruned."""
        acc, state = self.accelerator, self.state
        state.running = self.running.gathered(acc)
        name = ckpt.checkpoint_name(state.step)
        tmp = self.root / f".tmp-{name}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.seal(tmp, self.root / name, state)
            ckpt.prune(self.root, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()

    def train_epoch(self, epoch: int, on_step: Callable[[int], None] | None
                    ) -> tuple[int, float]:
        """One pass over the training set (continuing a resumed epoch where it stopped):
        (records seen by this process, seconds)."""
        acc, cfg, job, state = self.accelerator, self.cfg, self.job, self.state
        self.train_dl.set_epoch(epoch)
        if hasattr(job.train_set, "set_epoch"):
            job.train_set.set_epoch(epoch)
        self.model.train()
        skip = state.batch
        loader = acc.skip_first_batches(self.train_dl, skip) if skip else self.train_dl
        if not skip:
            self.running.reset()
        start = time.perf_counter()
        seen = 0
        bar = progress_bar(loader, total=len(self.train_dl), initial=skip, enabled=self.bars,
                           desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, unit="batch")
        for batch in bar:
            loss, terms = self._step(batch)
            if not torch.isfinite(loss.detach()):
                raise ECGDistillError(
                    f"{job.name}: the training loss is {float(loss.detach())} at epoch "
                    f"{epoch + 1}, step {state.step + 1}; training diverged (lower train.lr, "
                    f"or train.mixed_precision: no)")
            n = len(batch["labels"])
            self.running.add({"loss": loss.detach(), **terms}, n)
            seen += n
            state.step += 1
            state.batch += 1
            rate = seen * acc.num_processes / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(refresh=False, loss=f"{float(loss.detach()):.4f}", rec_s=f"{rate:.0f}")
            if (cfg.checkpoint_every and acc.sync_gradients
                    and state.updates % cfg.checkpoint_every == 0
                    and state.batch < len(self.train_dl)):
                self.save_checkpoint()
            if on_step is not None:
                on_step(state.step)
        bar.close()
        return seen, time.perf_counter() - start

    def _step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward, backward, clipping and (when the accumulation is complete) an optimiser
        and scheduler step."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            with acc.autocast():
                loss, terms = self.job.loss_fn(self.model, batch)
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.grad_clip is not None:
                acc.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
                self.state.updates += 1
            self.optimizer.zero_grad()
        return loss, terms

    def end_epoch(self, epoch: int, seen: int, train_seconds: float) -> None:
        """Validation, the best model, early stopping, the checkpoint and the logs."""
        acc, cfg, job, state = self.accelerator, self.cfg, self.job, self.state
        train_means = self.running.means(acc)
        if job.validate is not None:
            result = job.validate(acc, self.model, self.val_dl, self.progress)
        else:
            result = evaluate(acc, self.model, self.val_dl, job.logits_fn,
                              progress=self.progress)
        row = {"epoch": epoch + 1, "step": state.step, "lr": self.scheduler.get_last_lr()[0],
               **{f"train_{k}": v for k, v in train_means.items()},
               "val_loss": result.loss, "val_macro_auc": result.macro_auc,
               "train_seconds": round(train_seconds, 3),
               "train_records_per_s": round(seen * acc.num_processes
                                            / max(train_seconds, 1e-9), 1)}
        auc = result.monitored if math.isfinite(result.monitored) else None
        # the first epoch always gives a best model; later ones must beat a finite AUC
        improved = state.best_epoch is None or (
            auc is not None and (state.best_metric is None or auc > state.best_metric))
        if improved:
            state.best_metric, state.best_epoch, state.stale_epochs = auc, epoch + 1, 0
            _save_best(acc, self.model, job, self.best_dir, result)
        else:
            state.stale_epochs += 1
        if cfg.early_stopping is not None and state.stale_epochs >= cfg.early_stopping:
            state.stopped_early = True
        state.history.append(row)
        state.epoch, state.batch = epoch + 1, 0
        self.running.reset()
        self.save_checkpoint()
        if acc.is_main_process:
            _write_logs(self.out_dir, job, state, result, acc, finished=False)
        if acc.log_with:
            acc.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        acc.print(
            f"{job.name} epoch {epoch + 1}/{self.epochs}: train loss "
            f"{train_means.get('loss', float('nan')):.4f}, val loss {result.loss:.4f}"
            f"{'' if job.validate else f', val macro AUC {result.macro_auc:.4f}'}"
            f"{' (best)' if improved else ''}, "
            f"{row['train_records_per_s']:.0f} records/s")
        if state.stopped_early:
            acc.print(f"{job.name}: early stopping after {cfg.early_stopping} epochs "
                      f"without improvement (best epoch {state.best_epoch})")


def _restore(accelerator, root: Path, job: TrainJob, running: _Running) -> ckpt.TrainerState:
    """Load the newest verified checkpoint into the prepared objects; its loop state.

    The main process verifies the checksums (once, not on every rank) and tells the others
    which checkpoint to load.
    """
    found: list[Any] = [None]
    if accelerator.is_main_process:
        latest = ckpt.latest_valid(root, warn=accelerator.print)
        found = [None if latest is None else (latest[0].name, asdict(latest[1]))]
    if accelerator.num_processes > 1:
        broadcast_object_list(found, from_process=0)
    if found[0] is None:
        raise ECGDistillError(f"{root}: no checkpoint passes verification; {_force(job)} "
                              f"starts over")
    folder, state = root / found[0][0], ckpt.TrainerState(**found[0][1])
    if state.fingerprint != job.fingerprint:
        raise ECGDistillError(f"{folder} belongs to a run with other settings; {_force(job)} "
                              f"deletes it and starts over")
    if state.processes != accelerator.num_processes:
        raise ECGDistillError(f"{folder} was written by {state.processes} process(es); resume "
                              f"it with as many (now {accelerator.num_processes})")
    accelerator.load_state(str(folder))
    if state.running:
        running.load(state.running[accelerator.process_index])
    accelerator.print(f"{job.name}: resumed from {folder.name} (epoch {state.epoch + 1}, "
                      f"{state.batch} batches in)")
    return state


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    """Scalar hyper-parameters for the tracker (nested sections flattened with dots)."""
    out: dict[str, Any] = {}
    for k, v in asdict(cfg).items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v if v is not None else "none"
    return out


def _save_best(accelerator, model: nn.Module, job: TrainJob, best_dir: Path,
               result: EvalResult) -> None:
    """Write the model and its validation predictions to ``best/`` (atomically replaced).

    Under FSDP or DeepSpeed the parameters are sharded: the full state dict is gathered
    (a collective, so every process calls it) and handed to the model's save.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with atomic_dir(best_dir) as tmp:
            job.save_model(unwrapped, tmp, state_dict)
            np.savez(tmp / "val_predictions.npz", index=result.index, probs=result.probs,
                     labels=result.labels)
    accelerator.wait_for_everyone()


def _metrics(job: TrainJob, state: ckpt.TrainerState, accelerator,
             seconds: float | None) -> dict[str, Any]:
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
    return {
        "job": job.name,
        "fingerprint": job.fingerprint,
        "best_epoch": state.best_epoch,
        "best_val_macro_auc": state.best_metric,
        "epochs_run": len(state.history),
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "processes": accelerator.num_processes,
        "machine": machine_description(accelerator.num_processes),
        "val_records": len(job.val_set),
        "best": best,
        "history": state.history,
        "seconds_this_session": None if seconds is None else round(seconds, 2),
    }


def _write_logs(out_dir: Path, job: TrainJob, state: ckpt.TrainerState,
                result: EvalResult | None, accelerator, finished: bool,
                seconds: float | None = None) -> None:
    metrics = _metrics(job, state, accelerator, seconds)
    metrics["complete"] = finished
    if result is not None and job.class_names:
        metrics["last_val_label_auc"] = dict(zip(job.class_names, result.label_auc))
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1, default=float))
    _write_csv(out_dir / "log.csv", state.history)
