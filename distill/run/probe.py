"""``ecg-distill probe``: the seed papers' evaluation protocols for a pretrained encoder.

On a labelled data set's folds (PTB-XL layout, or a recipe's data section, e.g. the
synthetic default) and its test fold, for a pretraining folder (``ecg-distill pretrain``'s
``best/``) or any saved CSFM/LAMAE/Hypnos encoder:

* **linear probing**: frozen pooled embeddings, a standard scaler and one scikit-learn
  logistic regression per label, trained on 1%, 10% and 100% of the training labels
  (label efficiency; patient-grouped, stratified, seeded subsets);
* **MLP probing** (Hypnos' second protocol): the same embeddings and subsets, one
  scikit-learn MLP (one hidden layer) for all labels;
* **fine-tuning** at the chosen fractions: the pretrained encoder and a new head trained on
  those labels through the shared Accelerate loop (best epoch on the validation fold),
  beside **the same architecture from scratch** on the same labels;
* **cross-configuration without architecture change**: the same weights loaded to read lead
  I alone and the 6 limb leads (``from_pretrained(..., leads=...)``), linearly probed;
* **reconstruction error** on the test fold for every masking strategy (the pretraining
  folder's decoder; one fixed mask per record).

Every AUC has a bootstrap interval on shared test resamples; at each fine-tuned fraction
the linear and MLP probes and the fine-tuned model get a paired difference against
scratch, in macro AUC and, with ``label`` (e.g. ``AFIB`` on the rhythm task: Hypnos' atrial
fibrillation detection), in that label's AUC. Written: ``probe.json`` and
``predictions.npz`` (test probabilities of every protocol, for paired comparisons between
models).

An RVQ tokenizer (``pretrain.family: rvq``) gets the codec protocol instead
(:func:`distill.run.codec.run_codec`): PRD and Pearson r per lead, codebook usage and the
rate-distortion curve.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import students  # registers the encoder classes with AutoModel
from distill.core.errors import ECGDistillError
from distill.core.io import atomic_write_text, require_safetensors
from distill.data.dataset import ECGData, ECGSplit, SignalView, load_ptbxl
from distill.data.load import load_data
from distill.data.transfer import labeled_training_rows
from distill.engine.pretrain import reconstruction_error
from distill.engine.train import TrainJob, fit
from distill.metrics.classification import (bootstrap_interval, bootstrap_samples,
                                            paired_difference)
from distill.models.hypnos import HypnosConfig
from distill.models.masked import MASK_STRATEGIES, MaskedSignalConfig
from distill.recipe import TrainConfig, load_recipe
from distill.run.codec import (codec_output, format_codec, is_tokenizer, load_tokenizer_folder,
                               run_codec)
from students.preprocess import scaler_from_config

FRACTIONS: tuple[float, ...] = (0.01, 0.1, 1.0)
PROBED = (MaskedSignalConfig, HypnosConfig)  # the encoders whose embeddings are probed
LEAD_SETS: dict[str, tuple[str, ...] | None] = {
    "12 leads": None,
    "lead I": ("I",),
    "limb leads": ("I", "II", "III", "aVR", "aVL", "aVF"),
}


def load_encoder(checkpoint: str | Path, leads: Sequence[str] | None = None,
                 **overrides: Any) -> nn.Module:
    """The encoder of a pretraining folder (decoder dropped) or a saved encoder, reading
    ``leads`` (default: those it was saved with) with unchanged weights."""
    from transformers import AutoConfig, AutoModel

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").exists():
        raise ECGDistillError(f"{checkpoint}: no config.json; not a saved model folder")
    require_safetensors(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    if not isinstance(config, PROBED):
        raise ECGDistillError(f"{checkpoint}: a {config.model_type} model; probing takes a "
                              f"pretrained encoder (csfm, lamae, hypnos) or an RVQ tokenizer")
    if leads is not None:
        overrides["leads"] = list(leads)
    return AutoModel.from_pretrained(checkpoint, **overrides).eval()


def load_probe_data(data: str | Path, config: Any, *, progress: bool = True
                    ) -> ECGData:
    """A labelled data set: a recipe file (its data section) or a PTB-XL-layout folder
    (superdiagnostic task); scaled as the encoder was pretrained (its config's scaler)."""
    data = Path(data)
    rate = int(config.sampling_rate)
    if data.suffix in (".yaml", ".yml"):
        section = load_recipe(data).data
        if section.sampling_rate != rate:
            raise ECGDistillError(f"{data}: data.sampling_rate is {section.sampling_rate} Hz, "
                                  f"the encoder reads {rate} Hz")
        loaded = load_data(section, progress=progress)
    else:
        loaded = load_ptbxl(data, task="superdiagnostic", sampling_rate=100 if rate <= 100 else 500,
                            progress=progress)
    samples = round(loaded.store.shape[-1] * rate / loaded.sampling_rate)  # at the encoder's rate
    if samples != config.input_samples:
        raise ECGDistillError(f"{data}: records of {samples} samples at {rate} Hz, the encoder "
                              f"reads {config.input_samples}")
    if getattr(config, "normalization", None):
        loaded.scaler = scaler_from_config(config)
    return loaded


def embeddings(encoder: nn.Module, data: ECGData, rows: np.ndarray, *,
               batch_size: int = 128) -> np.ndarray:
    """Pooled embeddings [n, D] of records ``rows`` in the encoder's leads."""
    cfg = encoder.config
    view = {"signal": SignalView(leads=tuple(cfg.leads), sampling_rate=int(cfg.sampling_rate))}
    loader = DataLoader(ECGSplit(data, rows, view), batch_size=batch_size)
    out = []
    with torch.no_grad():
        for batch in loader:
            out.append(encoder(signal=batch["signal"]).pooled.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, cfg.hidden_size), dtype=np.float32)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *,
                 c: float = 1.0, seed: int = 0) -> np.ndarray:
    """One L2 logistic regression per label on standardised features -> test probabilities
    [n, C]; a label with one class in the training rows predicts its training rate."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    xtr, xte = scaler.transform(train_x), scaler.transform(test_x)
    probs = np.empty((len(test_x), train_y.shape[1]), dtype=np.float64)
    for j in range(train_y.shape[1]):
        y = train_y[:, j]
        if y.min() == y.max():
            probs[:, j] = float(y.mean())
            continue
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xtr, y)
        probs[:, j] = clf.predict_proba(xte)[:, 1]
    return probs


def mlp_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *,
              hidden: int = 128, alpha: float = 1e-3, seed: int = 0) -> np.ndarray:
    """One scikit-learn MLP (a hidden layer of ``hidden`` ReLU units, L2 ``alpha``) for all
    labels on standardised features -> test probabilities [n, C]; labels with one class in
    the training rows predict their training rate."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    xtr, xte = scaler.transform(train_x), scaler.transform(test_x)
    varied = train_y.min(axis=0) != train_y.max(axis=0)
    probs = np.tile(train_y.mean(axis=0, dtype=np.float64), (len(test_x), 1))
    if varied.sum() == 1:  # one varying label: scikit-learn's binary case
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=alpha, max_iter=500,
                            random_state=seed).fit(xtr, train_y[:, varied].ravel())
        probs[:, varied] = clf.predict_proba(xte)[:, 1:]
    elif varied.any():  # several: one network with a sigmoid output per label
        clf = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=alpha, max_iter=500,
                            random_state=seed).fit(xtr, train_y[:, varied])
        probs[:, varied] = clf.predict_proba(xte)
    return probs


def finetune(checkpoint: Path, data: ECGData, rows: np.ndarray, out_dir: Path, *,
             scratch: bool, epochs: int, lr: float, batch_size: int = 64, seed: int = 0,
             progress: bool = True) -> np.ndarray:
    """Train the encoder (pretrained, or the same architecture from random weights with
    ``scratch``) with a new head on ``rows``' labels; test-fold probabilities of the best
    epoch (validation macro AUC)."""
    from accelerate.utils import set_seed
    from transformers import AutoConfig, AutoModel

    classes = list(data.classes)
    labels = {"num_labels": len(classes), "id2label": dict(enumerate(classes)),
              "label2id": {c: i for i, c in enumerate(classes)}}
    set_seed(seed)
    if scratch:  # random weights, but for a fixed input representation (Hypnos' tokenizer)
        config = AutoConfig.from_pretrained(checkpoint, **labels)
        model = AutoModel.from_config(config)
        kept = getattr(model, "pretrained_inputs", ())
        if kept:
            pretrained = AutoModel.from_pretrained(checkpoint)
            for name in kept:
                model.get_submodule(name).load_state_dict(
                    pretrained.get_submodule(name).state_dict())
    else:
        model = AutoModel.from_pretrained(checkpoint, ignore_mismatched_sizes=True, **labels)
    view = {"signal": SignalView(leads=tuple(model.config.leads),
                                 sampling_rate=int(model.config.sampling_rate))}
    job = TrainJob(
        name=f"{'scratch' if scratch else 'fine-tune'} {model.family}", stage="probe",
        model=model, train_set=ECGSplit(data, rows, view, seed=seed),
        val_set=data.split("val", view, seed=seed),
        loss_fn=lambda m, b: (m(signal=b["signal"], labels=b["labels"]).loss, {}),
        logits_fn=lambda m, b: m(signal=b["signal"]).logits,
        save_model=lambda m, f, sd: m.save_pretrained(f, state_dict=sd), class_names=classes)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr)
    result = fit(job, cfg, out_dir, seed=seed, progress=progress)
    best = AutoModel.from_pretrained(result.best_folder).eval()
    loader = DataLoader(data.split("test", view), batch_size=128)
    with torch.no_grad():
        logits = torch.cat([best(signal=b["signal"]).logits for b in loader])
    return torch.sigmoid(logits).numpy()


def reconstruction_by_strategy(checkpoint: Path, data: ECGData) -> dict[str, dict[str, float]]:
    """Test-fold reconstruction error (MSE, NMSE) for every mask strategy at the model's
    ratio, or {} when the folder holds no decoder (a saved encoder)."""
    from transformers import AutoConfig, AutoModelForPreTraining

    config = AutoConfig.from_pretrained(checkpoint)
    if not any(a.endswith("ForMaskedModeling") for a in (config.architectures or [])):
        return {}
    model = AutoModelForPreTraining.from_pretrained(checkpoint).eval()
    view = {"signal": SignalView(leads=tuple(config.leads),
                                 sampling_rate=int(config.sampling_rate))}
    test = data.split("test", view)
    return {s: reconstruction_error(model, test, strategy=s) for s in MASK_STRATEGIES}


def run_probe(checkpoint: str | Path, data: str | Path, *, out: str | Path | None = None,
              fractions: Sequence[float] = FRACTIONS, finetune_fractions: Sequence[float] = (0.1,),
              epochs: int = 30, lr: float = 1e-3, bootstrap: int = 1000, seed: int = 0,
              label: str | None = None, force: bool = False, progress: bool = True
              ) -> dict[str, Any]:
    """Run every protocol (module docstring); write and return the results.

    Args:
        label: one class also scored on its own (its AUC and paired differences), e.g.
            ``AFIB``.

    Raises:
        ECGDistillError: not a pretrained encoder, data it cannot read, a ``label`` the data
            lacks, or results already in ``out`` (without ``force``).
    """
    checkpoint = Path(checkpoint)
    if is_tokenizer(checkpoint):
        tokenizer = load_tokenizer_folder(checkpoint)
        where = codec_output(checkpoint, out, force)
        ds = load_probe_data(data, tokenizer.config, progress=progress)
        return run_codec(checkpoint, tokenizer, ds, data, where, bootstrap=bootstrap, seed=seed,
                         progress=progress)
    encoder = load_encoder(checkpoint)
    config = encoder.config
    out = Path(out) if out is not None else checkpoint.parent / "probe"
    if (out / "probe.json").exists() and not force:
        raise ECGDistillError(f"{out}/probe.json exists; --force replaces it")
    ds = load_probe_data(data, config, progress=progress)  # bad data: nothing removed yet
    if label is not None and label not in ds.classes:
        raise ECGDistillError(f"--label {label}: not a class of {data} ({', '.join(ds.classes)})")
    # earlier results (with --force) or an interrupted probe's fine-tuning folders: only
    # what a probe writes is removed, nothing else in ``out``
    for name in ("probe.json", "predictions.npz"):
        (out / name).unlink(missing_ok=True)
    for folder in [*out.glob("finetune-*"), *out.glob("scratch-*")]:
        shutil.rmtree(folder)
    test = ds.splits["test"]
    y_test = ds.labels[test]
    samples = bootstrap_samples(y_test, bootstrap, seed)
    preds: dict[str, np.ndarray] = {}
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "data": str(data),
                              "family": encoder.family, "classes": list(ds.classes),
                              "encoder_parameters": int(encoder.num_parameters()),
                              "test_records": int(len(test)), "bootstrap": bootstrap,
                              "linear": {}, "mlp": {}, "finetune": {}, "scratch": {},
                              "leads": {}, "scratch_minus": {}, "label": label}
    col = None if label is None else list(ds.classes).index(label)

    def score(name: str, probs: np.ndarray) -> dict[str, Any]:
        preds[name] = probs
        out = bootstrap_interval(y_test, probs, samples).to_dict()
        if col is not None:
            out[label] = bootstrap_interval(y_test[:, [col]], probs[:, [col]], samples).to_dict()
        return out

    def minus(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        out = paired_difference(y_test, a, b, samples).to_dict()
        if col is not None:
            out[label] = paired_difference(y_test[:, [col]], a[:, [col]], b[:, [col]],
                                           samples).to_dict()
        return out

    rows = {f: labeled_training_rows(ds, f, seed) for f in sorted(set(fractions)
                                                                  | set(finetune_fractions))}
    feats = {}
    for name, leads in LEAD_SETS.items():
        reader = encoder if leads is None else load_encoder(checkpoint, leads=leads)  # same weights
        feats[name] = (embeddings(reader, ds, ds.splits["train"]), embeddings(reader, ds, test))
    train_pos = {int(r): i for i, r in enumerate(ds.splits["train"])}
    full_train, full_test = feats["12 leads"]
    for f in fractions:
        pick = [train_pos[int(r)] for r in rows[f]]
        probs = linear_probe(full_train[pick], ds.labels[rows[f]], full_test, seed=seed)
        result["linear"][str(f)] = {"records": len(pick), **score(f"linear_{f}", probs)}
        probs = mlp_probe(full_train[pick], ds.labels[rows[f]], full_test, seed=seed)
        result["mlp"][str(f)] = {"records": len(pick), **score(f"mlp_{f}", probs)}
    for name, (tr, te) in feats.items():
        probs = linear_probe(tr, ds.labels[ds.splits["train"]], te, seed=seed)
        result["leads"][name] = score(f"leads_{name}", probs)
    for f in finetune_fractions:
        for kind in ("finetune", "scratch"):
            probs = finetune(checkpoint, ds, rows[f], out / f"{kind}-{f}", scratch=kind == "scratch",
                             epochs=epochs, lr=lr, seed=seed, progress=progress)
            result[kind][str(f)] = {"records": int(len(rows[f])), **score(f"{kind}_{f}", probs)}
        scratch = preds[f"scratch_{f}"]
        diffs = {"linear": f"linear_{f}", "mlp": f"mlp_{f}", "finetune": f"finetune_{f}"}
        result["scratch_minus"][str(f)] = {k: minus(preds[v], scratch)
                                           for k, v in diffs.items() if v in preds}
    result["reconstruction"] = reconstruction_by_strategy(checkpoint, ds)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "predictions.npz", labels=y_test, index=test,
             **{k.replace(" ", "_"): v for k, v in preds.items()})
    atomic_write_text(out / "probe.json", json.dumps(result, indent=1))
    result["out"] = str(out)
    return result


def format_probe(result: dict[str, Any]) -> str:
    """The printed summary of :func:`run_probe`."""
    if result.get("kind") == "codec":
        return format_codec(result)
    label = result.get("label")

    def iv(d: dict[str, Any], sign: str = "") -> str:
        text = f"{d['value']:{sign}.3f} [{d['low']:{sign}.3f}, {d['high']:{sign}.3f}]"
        if label is not None and label in d:
            text += (f"; {label} " + iv(d[label], sign))
        return text

    lines = [f"{result['family']} ({result['encoder_parameters']:,} parameters) on "
             f"{result['data']}, test fold ({result['test_records']} records); macro AUC "
             f"[95% CI]" + (f", then {label} AUC" if label else "")]
    for f, r in result["linear"].items():
        lines.append(f"  linear probe, {float(f):.0%} labels ({r['records']} records): {iv(r)}")
    for f, r in result.get("mlp", {}).items():
        lines.append(f"  MLP probe, {float(f):.0%} labels ({r['records']} records): {iv(r)}")
    for f, r in result["finetune"].items():
        s = result["scratch"][f]
        lines.append(f"  fine-tuned, {float(f):.0%} labels: {iv(r)}; from scratch: {iv(s)}")
        for k, d in result["scratch_minus"][f].items():
            lines.append(f"    {k} - scratch: {iv(d, '+')}")
    for name, r in result["leads"].items():
        lines.append(f"  linear probe on {name} (same weights): {iv(r)}")
    for s, r in result["reconstruction"].items():
        lines.append(f"  reconstruction, {s} mask: MSE {r['mse']:.4f}, NMSE {r['nmse']:.3f}")
    return "\n".join(lines)
