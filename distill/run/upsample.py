"""Upsampling ECGs from 25 Hz to 100 Hz with the CLMT-style translator
(:mod:`distill.models.translator`): training it, upsampling WFDB records, and measuring it
against cubic-spline interpolation.

**Training** (:func:`run_translate`, recipe section ``translate``; ``recipes/translator.yaml``)
runs three jobs of the shared Accelerate loop (:func:`distill.engine.train.fit`: checkpoints,
exact ``resume``, the best epoch by the validation fold), each under ``<run>/``:

1. ``tokenizer-25hz/`` and 2. ``tokenizer-100hz/``: an RVQ tokenizer (``rvq`` preset, 0.4 s
   patches) at each rate, on the training folds of the data set (every lead a stream: the
   tokenizer reads leads independently with the same weights); the best epoch has the lowest
   validation loss (reconstruction MSE + commitment);
3. ``translator/``: the translator over the two frozen tokenizers, trained on every (record,
   lead) stream of the training folds (the 25 Hz view of the record in, its 100 Hz view the
   target); the best epoch has the lowest validation MSE of the upsampled signal (the
   inference path: predicted latents quantized by the 100 Hz codebooks, then decoded).

``<run>/translator/best`` is the self-contained model (both tokenizers inside). A finished
job is skipped when its settings are unchanged (``translate.json`` keeps the fingerprints).

**Evaluation** (:func:`evaluate_upsampling`) on a fold (the test fold), lead by lead: the
25 Hz view of each record (the data's anti-aliasing polyphase resampling) is upsampled by the
translator and by a cubic spline (not-a-knot, :class:`scipy.interpolate.CubicSpline`)
through the same samples, and each is compared with the record's 100 Hz view:

- Pearson r over the record (:func:`distill.metrics.signal.pearson`);
- R-peak F1: wfdb's XQRS detector (:func:`wfdb.processing.xqrs_detect`, each detection
  moved to the largest deflection within 100 ms by :func:`wfdb.processing.correct_peaks`)
  on the reference and on each upsampled signal, in mV (the scaler inverted); a detection
  matches a reference peak within ``tolerance_ms`` (50 ms: 5 samples at 100 Hz), one to one
  (:func:`rpeak_f1`).

Per record the leads' values are averaged; means over records get percentile bootstrap
intervals, and translator - cubic a paired one (the same records resampled). The 100 Hz
tokenizer's own reconstruction of the reference (encode + decode) is reported beside them:
the ceiling of any translation that ends in its codes.

**Records** (:func:`upsample_record`): a 25 Hz WFDB record, every channel translated (in
windows of the model's length, cross-faded where they overlap), written as a 100 Hz WFDB
record.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from distill.core.errors import DataError, ECGDistillError, RecipeError
from distill.core.hashing import stable_hash
from distill.core.io import atomic_write_text
from distill.core.leads import NUM_LEADS, STANDARD_LEADS, lead_index, lead_indices
from distill.core.progress import progress_bar
from distill.core.schema import build, to_dict
from distill.data.dataset import ECGData, SignalView
from distill.data.load import load_data
from distill.engine.accel import process_state
from distill.engine.jobs import local_weights, normalization, train_settings
from distill.engine.pretrain import batch_mean, mean_loss
from distill.engine.train import EvalResult, TrainJob, fit
from distill.metrics.signal import mean_interval, paired_mean_difference, pearson
from distill.models.rvq import RVQTokenizer
from distill.models.translator import (TOLERANCE_MS, TokenizerStage, TranslateConfig,
                                       TranslatorConfig, TranslatorModel, TranslatorStage,
                                       load_translator)
from distill.recipe import Recipe, load_recipe
from distill.recipe.load import parse_override, read_yaml, recipe_from_dict
from students._masked import pretraining_model, pretraining_sizes
from students.preprocess import scaler_from_config

SUMMARY = "translate.json"


# ---------------------------------------------------------------- the recipe


@dataclass
class TranslateRecipe:
    """A recipe with a ``translate`` section: the usual sections (data, train, seed, output
    folder) and the translator's."""

    recipe: Recipe
    translate: TranslateConfig

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir


def load_translate_recipe(path: str | Path, overrides: Sequence[str] = ()) -> TranslateRecipe:
    """Read a translator recipe (e.g. ``recipes/translator.yaml``): its ``translate``
    section (:class:`~distill.models.translator.TranslateConfig`) and the usual ones;
    ``key.sub=value`` overrides for either (``translate.translator.epochs=4``). Unknown
    keys, wrong types and values out of range are refused with one line naming the key.

    Once the recipe schema has the section (``Recipe.translate``), this is
    :func:`~distill.recipe.load_recipe`; until then the section is read here and the rest
    by the schema."""
    if _schema_has_section():
        recipe = load_recipe(path, overrides)
        translate = recipe.translate
    else:
        data = read_yaml(path)
        data.setdefault("name", Path(path).stem)
        section = data.pop("translate", None) or {}
        if not isinstance(section, Mapping):
            raise RecipeError(f"{path}: translate: expected a mapping, got {section!r}")
        mine = [o for o in overrides if o.split("=", 1)[0].split(".")[0] == "translate"]
        rest = [o for o in overrides if o not in mine]
        try:
            translate = build(TranslateConfig, _override(dict(section), mine), "translate")
            recipe = recipe_from_dict(data, rest)
        except RecipeError as exc:
            raise RecipeError(f"{path}: {exc}") from None
    sizes = pretraining_sizes("rvq")
    if translate.tokenizer.size not in sizes:
        raise RecipeError(f"{path}: translate.tokenizer.size: {translate.tokenizer.size!r} is "
                          f"not an rvq preset; expected one of {', '.join(sizes)}")
    if recipe.data.sampling_rate != translate.target_rate:
        raise RecipeError(f"{path}: translate.target_rate is {translate.target_rate} Hz, "
                          f"data.sampling_rate {recipe.data.sampling_rate} Hz (the reference "
                          f"is the data at its own rate)")
    return TranslateRecipe(recipe, translate)


def _schema_has_section() -> bool:
    """Whether the recipe schema declares the ``translate`` section itself."""
    return any(f.name == "translate" for f in dataclasses.fields(Recipe))


def _override(section: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``translate.a.b=value`` overrides set into the raw section (the value read as YAML;
    the keys are checked when the section is built)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = section
        for part in parts[1:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if len(parts) < 2:
            raise RecipeError(f"override '{text}': name a key of the translate section")
        node[parts[-1]] = value
    return section


# ---------------------------------------------------------------- data


class StreamSet(Dataset):
    """Every (record, lead) stream of a split, held in memory at both rates: items
    ``signal`` [1, T_source], ``target`` [1, T_target], ``lead`` (standard index),
    ``labels`` (an empty [0] tensor: the shared training loop's batches carry labels, and
    translation reads none), ``index`` (the stream) and
    one entry per ``extras`` array ([n, L, ...] per record and lead: the stream's row)."""

    def __init__(self, source: np.ndarray, target: np.ndarray, leads: Sequence[int]) -> None:
        self.source = torch.from_numpy(np.ascontiguousarray(source, dtype=np.float32))
        self.target = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))
        self.leads = torch.tensor(list(leads), dtype=torch.long)
        self.per_record = len(self.leads)
        self.extras: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.source.shape[0] * self.per_record

    def __getitem__(self, i: int) -> dict[str, Any]:
        r, j = divmod(int(i), self.per_record)
        item = {"signal": self.source[r, j:j + 1], "target": self.target[r, j:j + 1],
                "lead": self.leads[j], "labels": torch.zeros(0), "index": int(i)}
        item.update({name: arr[r, j:j + 1] for name, arr in self.extras.items()})
        return item

    def precompute(self, model: TranslatorModel, *, batch_size: int = 64,
                   progress: bool = False) -> StreamSet:
        """Store what the frozen tokenizers make of every stream (source codes, prior and
        target latents: :meth:`TranslatorModel.stream_inputs`), so training computes it
        once instead of every epoch; returns self."""
        chunks: dict[str, list[torch.Tensor]] = {}
        n = self.source.shape[0]
        for start in progress_bar(range(0, n, batch_size), enabled=progress, leave=False,
                                  desc="tokenizing the streams", unit="batch"):
            part = model.stream_inputs(self.source[start:start + batch_size],
                                       self.target[start:start + batch_size])
            for name, value in part.items():
                chunks.setdefault(name, []).append(value.cpu())
        self.extras = {name: torch.cat(values) for name, values in chunks.items()}
        return self


def fold_arrays(data: ECGData, split: str, leads: Sequence[int], rates: Sequence[int], *,
                progress: bool = False, batch_size: int = 128) -> list[np.ndarray]:
    """A fold's records at each of ``rates`` (scaled, the data's resampling): one float32
    array [n, len(leads), T_rate] per rate."""
    names = [f"r{rate}" for rate in rates]
    names_leads = tuple(STANDARD_LEADS[i] for i in leads)
    views = {n: SignalView(leads=names_leads, sampling_rate=int(r)) for n, r in zip(names, rates)}
    loader = DataLoader(data.split(split, views), batch_size=batch_size)
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in progress_bar(loader, enabled=progress, desc=f"reading the {split} fold",
                              unit="batch", leave=False):
        for n in names:
            chunks[n].append(batch[n].numpy())
    return [np.concatenate(chunks[n]) for n in names]


def stream_set(data: ECGData, split: str, t: TranslateConfig, *, progress: bool = False
               ) -> StreamSet:
    """The streams of the recipe's training leads in a fold."""
    leads = lead_indices(t.leads)
    source, target = fold_arrays(data, split, leads, (t.source_rate, t.target_rate),
                                 progress=progress)
    return StreamSet(source, target, leads)


# ---------------------------------------------------------------- training


def _stage_dir(tr: TranslateRecipe, name: str) -> Path:
    return tr.run_dir / name


def tokenizer_dir(tr: TranslateRecipe, rate: int) -> Path:
    return _stage_dir(tr, f"tokenizer-{rate}hz")


def translator_dir(tr: TranslateRecipe) -> Path:
    return _stage_dir(tr, "translator")


def _loss_validation(accelerator: Any, model: nn.Module, loader: DataLoader, progress: bool
                     ) -> EvalResult:
    loss = mean_loss(model, loader, accelerator=accelerator,
                     progress=progress and accelerator.is_local_main_process)
    empty = np.zeros((0,))
    return EvalResult(loss=loss, macro_auc=float("nan"), label_auc=[], index=empty,
                      probs=empty, labels=empty, score=-loss)


def translation_error(model: nn.Module, loader: DataLoader, *, accelerator: Any = None,
                      progress: bool = False) -> float:
    """Mean squared error of the translation (the inference path) against the target over
    the streams of ``loader`` (with ``accelerator``, every process's)."""

    def term(m: nn.Module, batch: Mapping[str, Any], device: Any) -> tuple[torch.Tensor, float]:
        out = m(signal=batch["signal"].to(device), lead_ids=batch["lead"].to(device),
                **_precomputed(batch, device))
        err = (out.signal.double() - batch["target"].to(device).double()).pow(2)
        return err.sum(), err.numel()

    return batch_mean(model, loader, term, accelerator=accelerator, progress=progress)


def _precomputed(batch: Mapping[str, Any], device: Any = None) -> dict[str, torch.Tensor]:
    """The precomputed inputs a stream batch carries (:meth:`StreamSet.precompute`)."""
    return {k: batch[k] if device is None else batch[k].to(device)
            for k in ("codes", "prior", "target_latents") if k in batch}


def _translation_validation(accelerator: Any, model: nn.Module, loader: DataLoader,
                            progress: bool) -> EvalResult:
    mse = translation_error(model, loader, accelerator=accelerator,
                            progress=progress and accelerator.is_local_main_process)
    empty = np.zeros((0,))
    return EvalResult(loss=mse, macro_auc=float("nan"), label_auc=[], index=empty,
                      probs=empty, labels=empty, score=-mse)


def _save(m: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    m.save_pretrained(folder, state_dict=state_dict)


def tokenizer_job(tr: TranslateRecipe, data: ECGData, rate: int) -> TrainJob:
    """The job of the RVQ tokenizer at ``rate`` (the data's training folds, every lead)."""
    from accelerate.utils import set_seed

    t, recipe = tr.translate, tr.recipe
    set_seed(recipe.seed)
    samples = round(int(data.store.shape[-1]) * rate / data.sampling_rate)
    try:
        model = pretraining_model("rvq", t.tokenizer.size, **{
            **t.tokenizer.options, "sampling_rate": rate, "input_samples": samples,
            "patch_seconds": t.patch_seconds})
    except ValueError as exc:
        raise ECGDistillError(f"translate.tokenizer: {exc}") from None
    model.config.normalization = normalization(data)
    view = {"signal": SignalView(sampling_rate=rate)}
    settings = {"job": "translator tokenizer", "rate": rate, "data": data.fingerprint,
                "seed": recipe.seed, "train": _train(recipe, t.tokenizer, _epochs(t, rate)),
                "tokenizer": to_dict(t.tokenizer), "patch_seconds": t.patch_seconds}

    def loss_fn(m: nn.Module, batch: Mapping[str, Any]):
        out = m(signal=batch["signal"])
        return out.loss, {"mse": out.mse.detach()}

    return TrainJob(name=f"tokenizer {rate} Hz", stage="", model=model,
                    train_set=data.split("train", view, seed=recipe.seed),
                    val_set=data.split("val", view, seed=recipe.seed), loss_fn=loss_fn,
                    logits_fn=_no_logits, save_model=_save, fingerprint=stable_hash(settings),
                    validate=_loss_validation)


def translator_job(tr: TranslateRecipe, data: ECGData, source: Path, target: Path, *,
                   progress: bool = False) -> TrainJob:
    """The translator's job over the trained tokenizers in ``source`` and ``target``."""
    from accelerate.utils import set_seed

    t, recipe = tr.translate, tr.recipe
    set_seed(recipe.seed)
    src = RVQTokenizer.from_pretrained(source).eval()
    tgt = RVQTokenizer.from_pretrained(target).eval()
    try:
        model = TranslatorModel.from_tokenizers(src, tgt, **t.translator.options)
    except (ValueError, TypeError) as exc:
        raise ECGDistillError(f"translate.translator.options: {exc}") from None
    model.config.normalization = normalization(data)

    def loss_fn(m: nn.Module, batch: Mapping[str, Any]):
        out = m(signal=batch["signal"], target=batch["target"], lead_ids=batch["lead"],
                **_precomputed(batch))
        return out.loss, {"latent": out.latent_loss.detach(), "signal": out.signal_loss.detach()}

    model.eval()
    train_set, val_set = (stream_set(data, split, t, progress=progress).precompute(
        model, progress=progress) for split in ("train", "val"))
    return TrainJob(name="translator", stage="", model=model,
                    train_set=train_set, val_set=val_set, loss_fn=loss_fn,
                    logits_fn=_no_logits, save_model=_save,
                    fingerprint=translator_fingerprint(tr, data, source, target),
                    validate=_translation_validation)


def translator_fingerprint(tr: TranslateRecipe, data: ECGData, source: Path,
                           target: Path) -> str:
    """What the trained translator depends on: the data, its settings and the tokenizers'
    weights (a tokenizer retrained in place makes it a new job)."""
    t, recipe = tr.translate, tr.recipe
    return stable_hash({"job": "translator", "data": data.fingerprint, "seed": recipe.seed,
                        "train": _train(recipe, t.translator),
                        "translator": to_dict(t.translator), "leads": t.leads,
                        "tokenizers": [local_weights(str(source)), local_weights(str(target))]})


def _epochs(t: TranslateConfig, rate: int) -> int:
    """Epochs of the tokenizer at ``rate``."""
    if rate == t.source_rate and t.tokenizer.source_epochs is not None:
        return t.tokenizer.source_epochs
    return t.tokenizer.epochs


def _no_logits(m: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    raise ECGDistillError("translation has no logits")  # validate is used instead


def _train(recipe: Recipe, stage: TokenizerStage | TranslatorStage,
           epochs: int | None = None) -> dict[str, Any]:
    settings = train_settings(recipe)
    settings.update(epochs=epochs or stage.epochs, lr=stage.lr, batch_size=stage.batch_size,
                    grad_clip=stage.grad_clip)
    return settings


def _run_job(job: TrainJob, tr: TranslateRecipe, stage: TokenizerStage | TranslatorStage,
             out: Path, done: dict[str, Any], key: str, *, resume: bool, force: bool,
             progress: bool, epochs: int | None = None) -> dict[str, Any]:
    """Train ``job`` under ``out`` unless ``done`` (the summary so far) already holds a
    finished job of the same fingerprint; its summary entry."""
    previous = done.get(key)
    best = out / "best"
    if previous and not force:
        if previous.get("fingerprint") == job.fingerprint and (best / "config.json").exists():
            print(f"{out}: {job.name} already trained (--force redoes it)")
            return previous
        raise ECGDistillError(f"{out} holds a {job.name} of other settings; --force deletes it "
                              f"and starts over")
    if force and out.exists():
        shutil.rmtree(out)
    cfg = dataclasses.replace(tr.recipe.train, batch_size=stage.batch_size,
                              grad_clip=stage.grad_clip)
    result = fit(job, cfg, out, seed=tr.recipe.seed, resume=resume, progress=progress,
                 epochs=epochs or stage.epochs, lr=stage.lr)
    best_loss = result.metrics["best_val_macro_auc"]
    return {"fingerprint": job.fingerprint, "model": str(result.best_folder),
            "parameters": int(sum(p.numel() for p in job.model.parameters())),
            "trainable_parameters": int(sum(p.numel() for p in job.model.parameters()
                                            if p.requires_grad)),
            "records": {"train": len(job.train_set), "val": len(job.val_set)},
            "best_epoch": result.metrics["best_epoch"],
            "best_val_loss": None if best_loss is None else -best_loss,
            "seconds": result.metrics["seconds_this_session"]}


def run_translate(tr: TranslateRecipe, *, resume: bool = False, force: bool = False,
                  progress: bool = True, evaluate: bool = True) -> dict[str, Any]:
    """Train the tokenizer pair and the translator (module docstring), then evaluate the
    translator against cubic interpolation on the test fold; returns (and writes
    ``<run>/translate.json``) the summary.

    Raises:
        ECGDistillError: a finished job of other settings in the folder (without ``force``),
            or checkpoints of an interrupted job without ``resume``.
    """
    t = tr.translate
    summary_file = tr.run_dir / SUMMARY
    done: dict[str, Any] = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    data = load_data(tr.recipe.data, progress=progress)
    summary: dict[str, Any] = {"source_rate": t.source_rate, "target_rate": t.target_rate,
                               "patch_seconds": t.patch_seconds}

    def write() -> None:
        if process_state().is_main_process:
            atomic_write_text(summary_file, json.dumps({**done, **summary}, indent=1))

    for rate in (t.source_rate, t.target_rate):
        key = f"tokenizer_{rate}hz"
        summary[key] = _run_job(tokenizer_job(tr, data, rate), tr, t.tokenizer,
                                tokenizer_dir(tr, rate), done, key, resume=resume, force=force,
                                progress=progress, epochs=_epochs(t, rate))
        write()
    source, target = (tokenizer_dir(tr, r) / "best" for r in (t.source_rate, t.target_rate))
    previous = done.get("translator") or {}
    fingerprint = translator_fingerprint(tr, data, source, target)
    if (previous.get("fingerprint") == fingerprint and not force
            and (translator_dir(tr) / "best" / "config.json").exists()):
        print(f"{translator_dir(tr)}: translator already trained (--force redoes it)")
        summary["translator"] = previous
    else:  # built only when it trains: reading and tokenizing the streams takes a while
        if previous.get("fingerprint") != fingerprint:
            done.pop("evaluation", None)
        job = translator_job(tr, data, source, target, progress=progress)
        summary["translator"] = _run_job(job, tr, t.translator, translator_dir(tr), done,
                                         "translator", resume=resume, force=force,
                                         progress=progress)
    write()
    if evaluate:
        previous = done.get("evaluation")
        wanted = {"leads": [STANDARD_LEADS[i] for i in lead_indices(t.evaluate.leads)],
                  "tolerance_ms": t.evaluate.tolerance_ms, "bootstrap": t.evaluate.bootstrap}
        if previous and not force and all(previous.get(k) == v for k, v in wanted.items()):
            summary["evaluation"] = previous
        else:
            model = load_translator(translator_dir(tr) / "best")
            summary["evaluation"] = evaluate_upsampling(
                model, data, "test", leads=t.evaluate.leads,
                tolerance_ms=t.evaluate.tolerance_ms, bootstrap=t.evaluate.bootstrap,
                seed=tr.recipe.seed, progress=progress)
        write()
    return {**done, **summary}


# ---------------------------------------------------------------- baselines and metrics


def cubic_upsample(signal: np.ndarray, fs_from: float, fs_to: float) -> np.ndarray:
    """Cubic-spline interpolation (not-a-knot) along the last axis: sample k of ``signal``
    sits at k / fs_from s; the output has ``round(T * fs_to / fs_from)`` samples at
    n / fs_to s (the last few extrapolated by the end polynomials)."""
    from scipy.interpolate import CubicSpline

    x = np.asarray(signal, dtype=np.float64)
    t = x.shape[-1]
    if t < 2:
        raise ValueError(f"cubic interpolation needs at least 2 samples, got {t}")
    n = round(t * fs_to / fs_from)
    spline = CubicSpline(np.arange(t) / fs_from, x, axis=-1)
    return spline(np.arange(n) / fs_to).astype(np.float32)


def detect_rpeaks(signal: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices of one lead (mV): wfdb's XQRS detector, each detection then
    moved to the largest deflection from the local mean within 100 ms
    (:func:`wfdb.processing.correct_peaks`; XQRS alone marks the QRS some 50 ms early at
    100 Hz). Empty when it finds none (or cannot run on the signal)."""
    from wfdb.processing import correct_peaks, xqrs_detect

    x = np.asarray(signal, dtype=np.float64)
    if not np.isfinite(x).all() or np.ptp(x) == 0:
        return np.zeros(0, dtype=np.int64)
    try:
        found = np.asarray(xqrs_detect(x, fs=fs, verbose=False), dtype=np.int64)
        if len(found) == 0:
            return found
        fixed = correct_peaks(x, found, search_radius=max(1, round(0.1 * fs)),
                              smooth_window_size=max(3, round(0.15 * fs)), peak_dir="compare")
        return np.unique(np.asarray(fixed, dtype=np.int64))
    except (ValueError, IndexError):
        return np.zeros(0, dtype=np.int64)


def rpeak_f1(reference: np.ndarray, detected: np.ndarray, tolerance: float) -> float:
    """F1 of ``detected`` peaks (sample indices) against ``reference`` ones: a detection
    matches a reference peak at most ``tolerance`` samples away, each used once (closest
    pairs first). 1.0 when both are empty; 0.0 when only one is."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    det = np.sort(np.asarray(detected, dtype=np.float64))
    if len(ref) == 0 and len(det) == 0:
        return 1.0
    if len(ref) == 0 or len(det) == 0:
        return 0.0
    dist = np.abs(ref[:, None] - det[None, :])
    pairs = np.argwhere(dist <= tolerance)
    order = np.argsort(dist[pairs[:, 0], pairs[:, 1]], kind="stable")
    used_r, used_d = set(), set()
    for i, j in pairs[order]:
        if i not in used_r and j not in used_d:
            used_r.add(int(i))
            used_d.add(int(j))
    tp = len(used_r)
    return 2.0 * tp / (len(ref) + len(det))


def tokenizer_roundtrip(tokenizer: RVQTokenizer, signal: torch.Tensor) -> torch.Tensor:
    """[B, L, T] -> the tokenizer's reconstruction from its codes (every depth), for any
    number of leads L (each read on its own)."""
    was = tokenizer.training
    tokenizer.eval()
    try:
        with torch.no_grad():
            quantized, _, _ = tokenizer.quantizer(tokenizer._latents(signal.float()))
            return tokenizer._samples(quantized.to(tokenizer.dtype), signal.shape[0])
    finally:
        tokenizer.train(was)


def _to_mv(x: np.ndarray, scaler: Any, leads: Sequence[int]) -> np.ndarray:
    """Undo the scaler: [..., L, T] scaled -> mV."""
    if scaler.kind == "none":
        return np.asarray(x, dtype=np.float64)
    idx = list(leads)
    return x * scaler.std[idx, None] + scaler.mean[idx, None]


def evaluate_upsampling(model: TranslatorModel, data: ECGData, split: str = "test", *,
                        leads: Sequence[str] | None = None,
                        tolerance_ms: float = TOLERANCE_MS, bootstrap: int = 1000,
                        seed: int = 0, batch_size: int = 32,
                        progress: bool = False) -> dict[str, Any]:
    """The translator against cubic interpolation of the same source samples on ``split``
    of ``data`` (scaled as the model was trained), lead by lead (module docstring).

    Args:
        model: a trained translator (its source rate is read from ``data`` by resampling;
            the reference is ``data`` at the target rate, which must be the data's rate or
            below it).
        leads: the leads evaluated (each a stream of its own); None = all 12.
        tolerance_ms: R-peak match tolerance.
        bootstrap, seed: resamples of the records for the intervals.

    Returns:
        {"methods": {name: {"r": interval, "f1": interval}}, "difference": {"r", "f1"}
        (translator - cubic, paired), "per_lead": {lead: {method: {"r", "f1"}}} (means),
        settings}; every interval a dict (value, low, high).
    """
    cfg: TranslatorConfig = model.config
    src_rate, tgt_rate = int(cfg.sampling_rate), cfg.target_rate
    idx = lead_indices(leads)
    lead_names = [STANDARD_LEADS[i] for i in idx]
    source, reference = fold_arrays(data, split, idx, (src_rate, tgt_rate), progress=progress)
    if source.shape[-1] != cfg.input_samples:
        raise ECGDistillError(f"{split} fold: records of {source.shape[-1]} samples at "
                              f"{src_rate} Hz; the translator reads {cfg.input_samples}")
    scaler = data.scaler
    model.eval()
    n, nl = source.shape[:2]
    methods = ("translator", "cubic", "tokenizer")
    r = {m: np.zeros((n, nl)) for m in methods}
    f1 = {m: np.zeros((n, nl)) for m in methods}
    tol = tolerance_ms / 1000.0 * tgt_rate
    ids = torch.tensor(idx)
    bar = progress_bar(total=n, enabled=progress, desc=f"upsampling the {split} fold",
                       unit="record", leave=False)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        x = torch.from_numpy(source[start:stop])
        ref = reference[start:stop]
        with torch.no_grad():
            outs = {
                "translator": model.translate(x, lead_ids=ids.expand(stop - start, -1)).numpy(),
                "cubic": cubic_upsample(source[start:stop], src_rate, tgt_rate),
                "tokenizer": tokenizer_roundtrip(model.target_tokenizer,
                                                 torch.from_numpy(ref)).numpy(),
            }
        ref_mv = _to_mv(ref, scaler, idx)
        mv = {m: _to_mv(v, scaler, idx) for m, v in outs.items()}
        for m, v in outs.items():
            r[m][start:stop] = pearson(ref, v)
        for b in range(stop - start):
            for j in range(nl):
                peaks = detect_rpeaks(ref_mv[b, j], tgt_rate)
                for m in methods:
                    f1[m][start + b, j] = rpeak_f1(peaks, detect_rpeaks(mv[m][b, j], tgt_rate),
                                                   tol)
        bar.update(stop - start)
    bar.close()

    def iv(values: np.ndarray) -> dict[str, float]:
        return mean_interval(np.nanmean(values, axis=1), resamples=bootstrap, seed=seed).to_dict()

    def diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        return paired_mean_difference(np.nanmean(a, axis=1), np.nanmean(b, axis=1),
                                      resamples=bootstrap, seed=seed).to_dict()

    return {
        "split": split, "records": int(n), "leads": lead_names, "source_rate": src_rate,
        "target_rate": tgt_rate, "tolerance_ms": tolerance_ms, "bootstrap": bootstrap,
        "detector": "wfdb.processing.xqrs_detect on the reference and on each upsampled signal",
        "methods": {m: {"r": iv(r[m]), "f1": iv(f1[m])} for m in methods},
        "difference": {"r": diff(r["translator"], r["cubic"]),
                       "f1": diff(f1["translator"], f1["cubic"])},
        "per_lead": {name: {m: {"r": float(np.nanmean(r[m][:, j])),
                                "f1": float(np.nanmean(f1[m][:, j]))} for m in methods}
                     for j, name in enumerate(lead_names)},
    }


METHOD_NAMES = {"translator": "translator (25 Hz tokens -> 100 Hz tokens)",
                "cubic": "cubic spline of the 25 Hz samples",
                "tokenizer": "100 Hz tokenizer on the true signal (ceiling)"}


def format_evaluation(result: Mapping[str, Any]) -> str:
    """The side-by-side table of :func:`evaluate_upsampling`."""
    def iv(d: Mapping[str, float], digits: int = 4) -> str:
        return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"

    leads = result["leads"]
    which = "all 12 leads" if len(leads) == NUM_LEADS else "lead " + ", ".join(leads)
    lines = [f"{result['source_rate']} Hz -> {result['target_rate']} Hz on the {result['split']} "
             f"fold ({result['records']} records, {which}, each lead on its own); mean [95% "
             f"bootstrap CI] over records; R-peaks by XQRS, matched within "
             f"{result['tolerance_ms']:g} ms",
             f"  {'method':<48} {'Pearson r':<26} R-peak F1"]
    for m, name in METHOD_NAMES.items():
        row = result["methods"][m]
        lines.append(f"  {name:<48} {iv(row['r']):<26} {iv(row['f1'])}")
    d = result["difference"]
    lines.append(f"  {'translator - cubic (paired)':<48} {iv(d['r'], 4):<26} {iv(d['f1'], 4)}")
    if len(leads) > 1:
        lines.append("  per lead (r / F1), translator vs cubic: " + ", ".join(
            f"{lead} {v['translator']['r']:.3f}/{v['translator']['f1']:.2f} vs "
            f"{v['cubic']['r']:.3f}/{v['cubic']['f1']:.2f}"
            for lead, v in result["per_lead"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- models and records


def _windows(total: int, window: int) -> list[int]:
    """Start samples of windows of ``window`` covering ``total`` (the last one flush with the
    end; consecutive windows overlap by at least a quarter window)."""
    if total <= window:
        return [0]
    hop = max(1, (3 * window) // 4)
    starts = list(range(0, total - window, hop))
    starts.append(total - window)
    return starts


def translate_signal(model: TranslatorModel, signal: np.ndarray, lead_ids: Sequence[int], *,
                     scaler: Any = None, batch_size: int = 32) -> np.ndarray:
    """Any length of signal [C, T] in mV at the source rate (rows: leads ``lead_ids``) ->
    [C, T * ratio] in mV at the target rate. Cut into windows of the model's length that
    overlap (a short record is padded with its edge values), translated, and joined with a
    linear cross-fade across each overlap."""
    cfg = model.config
    window, ratio = int(cfg.input_samples), cfg.target_rate // int(cfg.sampling_rate)
    scaler = scaler if scaler is not None else scaler_from_config(cfg)
    c, t = signal.shape
    x = scaler.apply(np.asarray(signal, dtype=np.float64), list(lead_ids))
    if t < window:
        x = np.pad(x, ((0, 0), (0, window - t)), mode="edge")
    total = x.shape[-1]
    starts = _windows(total, window)
    out = np.zeros((c, total * ratio))
    weight = np.zeros(total * ratio)
    ramp_len = max(1, (window - max(1, (3 * window) // 4)) * ratio)
    taper = np.ones(window * ratio)
    if len(starts) > 1:
        ramp = (np.arange(ramp_len) + 0.5) / ramp_len
        taper[:ramp_len] = ramp
        taper[-ramp_len:] = np.minimum(taper[-ramp_len:], ramp[::-1])
    ids = torch.tensor(list(lead_ids))
    pieces = np.stack([x[:, s:s + window] for s in starts])  # (W, C, window)
    results = []
    for i in range(0, len(pieces), batch_size):
        chunk = torch.from_numpy(pieces[i:i + batch_size].astype(np.float32))
        results.append(model.translate(chunk, lead_ids=ids.expand(len(chunk), -1)).numpy())
    translated = np.concatenate(results)  # (W, C, window * ratio)
    for k, s in enumerate(starts):
        w = taper.copy()
        if k == 0:
            w[:ramp_len] = 1.0
        if k == len(starts) - 1:
            w[-ramp_len:] = 1.0
        out[:, s * ratio:(s + window) * ratio] += translated[k] * w
        weight[s * ratio:(s + window) * ratio] += w
    out = out / np.maximum(weight, 1e-12)
    y = out[:, :t * ratio]
    if scaler.kind == "none":
        return y
    idx = list(lead_ids)
    return y * scaler.std[idx, None] + scaler.mean[idx, None]


_UNITS_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3}


def upsample_record(checkpoint: str | Path, record_path: str | Path, to: int = 100,
                    out: str | Path | None = None, *, force: bool = False,
                    model: TranslatorModel | None = None) -> Path:
    """Upsample a WFDB record with a saved translator and write it as a WFDB record.

    Every channel is translated on its own, from the record's rate (the translator's source
    rate, 25 Hz) to ``to`` Hz (its target rate); a channel named as a standard lead gets
    that lead's prompt, any other name lead I's.

    Args:
        checkpoint: the translator's folder (``<run>/translator/best``).
        record_path: the record (its ``.hea`` path, or the path without extension).
        to: the wanted rate; must be the translator's target rate.
        out: the record to write (a path without extension, or an existing folder: the
            record is written there as ``<name>_<to>hz``); default: next to the input,
            ``<name>_<to>hz``.
        force: replace files already there (never otherwise).
        model: the loaded translator (instead of loading ``checkpoint`` again).

    Returns:
        The written header (``.hea``) path.

    Raises:
        ECGDistillError: one line naming the file: no such record, an unreadable one, a rate
            other than the translator's source rate, NaN samples, an existing output.
    """
    import wfdb

    model = model if model is not None else load_translator(checkpoint)
    cfg = model.config
    if int(to) != cfg.target_rate:
        raise ECGDistillError(f"--to {to}: the translator {checkpoint} writes "
                              f"{cfg.target_rate} Hz")
    path = Path(record_path)
    if path.suffix in (".hea", ".dat", ".mat"):
        path = path.with_suffix("")
    header = path.with_name(path.name + ".hea")
    if not header.is_file():
        raise ECGDistillError(f"{header}: no such WFDB header")
    try:
        rec = wfdb.rdrecord(str(path))
    except Exception as exc:  # wfdb raises many kinds on a damaged record
        raise ECGDistillError(f"{header}: unreadable WFDB record ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
    if rec.p_signal is None or rec.p_signal.ndim != 2 or rec.p_signal.shape[0] < 2:
        raise ECGDistillError(f"{header}: the record holds no signal samples")
    if abs(float(rec.fs) - int(cfg.sampling_rate)) > 1e-6:
        raise ECGDistillError(f"{header}: the record is at {float(rec.fs):g} Hz; the translator "
                              f"reads {int(cfg.sampling_rate)} Hz")
    signal = np.asarray(rec.p_signal, dtype=np.float64).T  # (C, T)
    if not np.isfinite(signal).all():
        raise ECGDistillError(f"{header}: the record has missing (NaN) samples")
    units = [str(u or "mV") for u in (rec.units or ["mV"] * signal.shape[0])]
    try:
        factors = np.array([_UNITS_TO_MV[u.strip().lower()] for u in units])
    except KeyError:
        raise ECGDistillError(f"{header}: units {units} are not mV, uV or V") from None
    names = list(rec.sig_name or [f"ch{i}" for i in range(signal.shape[0])])
    lead_ids = []
    for name in names:
        try:
            lead_ids.append(lead_index(name))
        except DataError:
            lead_ids.append(0)  # a channel of no standard lead: lead I's prompt
    target = _output_path(path, out, int(to))
    written = [target.with_name(target.name + ext) for ext in (".hea", ".dat")]
    existing = [p for p in written if p.exists()]
    if existing and not force:
        raise ECGDistillError(f"{existing[0]} exists; --force replaces it")
    upsampled = translate_signal(model, signal * factors[:, None], lead_ids)  # mV
    upsampled = upsampled / factors[:, None]  # the record's own units
    target.parent.mkdir(parents=True, exist_ok=True)
    for p in existing:
        p.unlink()
    comments = list(rec.comments or []) + [
        f"upsampled from {float(rec.fs):g} Hz to {int(to)} Hz by the ecg-distill translator "
        f"{Path(checkpoint)}"]
    wfdb.wrsamp(target.name, fs=int(to), units=units, sig_name=names,
                p_signal=np.ascontiguousarray(upsampled.T), fmt=["16"] * len(names),
                comments=comments, write_dir=str(target.parent))
    return target.with_name(target.name + ".hea")


def _output_path(record: Path, out: str | Path | None, to: int) -> Path:
    """The output record path (without extension)."""
    name = f"{record.name}_{to}hz"
    if out is None:
        return record.with_name(name)
    out = Path(out)
    if out.is_dir():
        return out / name
    return out.with_suffix("") if out.suffix in (".hea", ".dat") else out
