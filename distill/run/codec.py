"""The codec protocol of ``ecg-distill probe`` for an RVQ tokenizer (``pretrain.family: rvq``).

On a data set's test fold (a recipe's data section or a PTB-XL-layout folder, scaled as the
tokenizer was trained): every record is encoded once, then decoded from its first k
codebooks for k = 1..K. Reported, with bootstrap intervals over records:

- PRD (mean-removed, %) and Pearson r per lead at the full depth;
- PRD and r for every depth k against its bit rate (k * log2(C) bits per patch, per lead;
  the rate-distortion curve, drawn as ``rate-distortion.png`` with the clinical PRD bands);
- codebook usage per codebook on the test codes: perplexity, codes used, dead codes.

Written: ``codec.json`` and ``rate-distortion.png`` in the output folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from distill.core.errors import ECGDistillError
from distill.core.io import atomic_write_text, require_safetensors
from distill.core.leads import STANDARD_LEADS
from distill.core.progress import progress_bar
from distill.data.dataset import SignalView
from distill.metrics.signal import PRD_BANDS, codebook_usage, mean_interval, pearson, prd
from distill.models.rvq import RVQTokenizer, RVQTokenizerConfig

FIGURE = "rate-distortion.png"


def is_tokenizer(checkpoint: str | Path) -> bool:
    """Whether a saved model folder holds an RVQ tokenizer."""
    config = Path(checkpoint) / "config.json"
    if not config.exists():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == RVQTokenizerConfig.model_type
    except json.JSONDecodeError:
        return False


def load_tokenizer_folder(checkpoint: str | Path) -> RVQTokenizer:
    """A saved RVQ tokenizer, in eval mode; a one-line error naming the folder otherwise."""
    checkpoint = Path(checkpoint)
    if not is_tokenizer(checkpoint):
        raise ECGDistillError(f"{checkpoint}: not a saved RVQ tokenizer (no config.json of "
                              f"model_type {RVQTokenizerConfig.model_type})")
    require_safetensors(checkpoint)
    return RVQTokenizer.from_pretrained(checkpoint).eval()


def codec_measurements(tokenizer: RVQTokenizer, dataset: Any, *, batch_size: int = 64,
                       progress: bool = False) -> dict[str, np.ndarray]:
    """Per record and lead, for every depth: PRD [K, n, L] and Pearson r [K, n, L]; and the
    codes [n, L, N, K]."""
    k = tokenizer.config.num_quantizers
    prds, rs, codes = [], [], []
    with torch.no_grad():
        for batch in progress_bar(DataLoader(dataset, batch_size=batch_size), enabled=progress,
                                  desc="codec", unit="batch", leave=False):
            x = batch["signal"].float()
            c = tokenizer.encode(x)
            codes.append(c.numpy())
            ref = x.numpy()
            outs = [tokenizer.decode(c, depth=d).numpy() for d in range(1, k + 1)]
            prds.append(np.stack([prd(ref, y) for y in outs]))
            rs.append(np.stack([pearson(ref, y) for y in outs]))
    return {"prd": np.concatenate(prds, axis=1), "r": np.concatenate(rs, axis=1),
            "codes": np.concatenate(codes)}


def codec_output(checkpoint: str | Path, out: str | Path | None, force: bool) -> Path:
    """Where the codec protocol writes; an error if results are there (without ``force``)."""
    out = Path(out) if out is not None else Path(checkpoint).parent / "probe"
    if (out / "codec.json").exists() and not force:
        raise ECGDistillError(f"{out}/codec.json exists; --force replaces it")
    return out


def run_codec(checkpoint: str | Path, tokenizer: RVQTokenizer, ds: Any, data: str | Path,
              out: Path, *, bootstrap: int = 1000, seed: int = 0,
              progress: bool = True) -> dict[str, Any]:
    """The codec protocol (module docstring) of ``tokenizer`` (loaded from ``checkpoint``)
    on ``ds`` (the data set ``data`` names, scaled as the tokenizer was trained); writes
    into ``out`` and returns the results."""
    cfg = tokenizer.config
    view = {"signal": SignalView(leads=tuple(cfg.leads), sampling_rate=int(cfg.sampling_rate))}
    test = ds.split("test", view)
    m = codec_measurements(tokenizer, test, progress=progress)

    def iv(values: np.ndarray) -> dict[str, float]:
        """[n] or [n, L] -> the mean with an interval over records (leads of a record are
        averaged first: they are not independent)."""
        per_record = np.nanmean(values, axis=-1) if values.ndim == 2 else values
        return mean_interval(per_record, resamples=bootstrap, seed=seed).to_dict()

    full = cfg.num_quantizers - 1
    leads = list(cfg.leads)
    result: dict[str, Any] = {
        "kind": "codec", "checkpoint": str(checkpoint), "data": str(data),
        "family": "rvq", "parameters": int(tokenizer.num_parameters()),
        "test_records": len(test), "bootstrap": bootstrap,
        "codebooks": cfg.num_quantizers, "codebook_size": cfg.codebook_size,
        "patch_seconds": cfg.patch_size / cfg.sampling_rate,
        "raw_bits_per_second": 16 * cfg.sampling_rate,  # a 16-bit sample per lead
        "per_lead": {lead: {"prd": iv(m["prd"][full, :, j]), "r": iv(m["r"][full, :, j])}
                     for j, lead in enumerate(leads)},
        "depths": [{"depth": d + 1, "bits_per_second": cfg.bits_per_second(d + 1),
                    "prd": iv(m["prd"][d]), "r": iv(m["r"][d])}
                   for d in range(cfg.num_quantizers)],
        "usage": codebook_usage(m["codes"], cfg.codebook_size),
        "prd_bands": PRD_BANDS,
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_rate_distortion(result, out / FIGURE)
    atomic_write_text(out / "codec.json", json.dumps(result, indent=1))
    result["out"] = str(out)
    return result


def plot_rate_distortion(result: dict[str, Any], path: Path) -> Path:
    """PRD (mean and 95% interval) against bits per second per lead for depths 1..K, the
    clinical PRD bands shaded."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110)
    ax = fig.subplots()
    depths = result["depths"]
    bits = [d["bits_per_second"] for d in depths]
    mean = np.array([d["prd"]["value"] for d in depths])
    low = np.array([d["prd"]["low"] for d in depths])
    high = np.array([d["prd"]["high"] for d in depths])
    colours = {"very good": "#b7e1b0", "good": "#f3e3a0"}
    for name, (lo, hi) in result["prd_bands"].items():
        ax.axhspan(lo, hi, color=colours.get(name, "#dddddd"), alpha=0.6,
                   label=f'PRD {lo:g}-{hi:g}%: "{name}"')
    ax.errorbar(bits, mean, yerr=[mean - low, high - mean], marker="o", color="#1f4e79",
                capsize=3, label="RVQ tokenizer, depth 1..K")
    for d, x, y in zip(depths, bits, mean):
        ax.annotate(str(d["depth"]), (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("bits per second per lead")
    ax.set_ylabel("PRD (mean-removed, %)")
    ax.set_ylim(0, max(float(np.nanmax(high)) * 1.1, 10.0))
    ax.set_title(f"Rate-distortion on the test fold ({result['test_records']} records)",
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def format_codec(result: dict[str, Any]) -> str:
    """The printed summary of :func:`run_codec`."""
    def iv(d: dict[str, float], digits: int = 2) -> str:
        return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"

    lines = [f"RVQ tokenizer ({result['parameters']:,} parameters; {result['codebooks']} "
             f"codebooks of {result['codebook_size']}, {result['patch_seconds']:g} s patches) "
             f"on {result['data']}, test fold ({result['test_records']} records); mean "
             f"[95% CI] over records"]
    lines.append("  depth  bits/s/lead  PRD %              Pearson r")
    for d in result["depths"]:
        lines.append(f"  {d['depth']:>5}  {d['bits_per_second']:>11.0f}  {iv(d['prd']):<18} "
                     f"{iv(d['r'], 4)}")
    lines.append(f"  (raw: {result['raw_bits_per_second']} bits/s/lead at 16 bits a sample)")
    order = [lead for lead in STANDARD_LEADS if lead in result["per_lead"]]
    lines.append("  per lead at full depth: " + ", ".join(
        f"{lead} PRD {result['per_lead'][lead]['prd']['value']:.1f}% r "
        f"{result['per_lead'][lead]['r']['value']:.3f}" for lead in order))
    lines.append("  codebook usage (perplexity / codes used / dead): " + "; ".join(
        f"{i + 1}: {u['perplexity']:.0f}/{u['used']}/{u['dead']}"
        for i, u in enumerate(result["usage"])))
    return "\n".join(lines)
