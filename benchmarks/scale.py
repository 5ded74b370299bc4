"""Real teacher architectures with random weights: throughput, memory and teacher-cache cost
per record, and what PTB-XL and MIMIC-IV-ECG cost at that rate.

No download: each model is built from its configuration alone
(:data:`distill.run.plan.KNOWN_CONFIGS`, the published numbers written out) with random
weights.

- **LLaVA-1.5-7B** (CLIP ViT-L/14-336, 576 visual tokens; Llama-2-7B language model, 4,096
  wide), its language model in 4-bit NF4 through bitsandbytes (the recipe's ``load_in:
  4bit``; the vision tower, projector and vocabulary head unquantized, as
  :class:`teachers.vlm.VLMTeacher` loads it), fp32 compute (the project's
  :func:`teachers.base.quantization_config`: CPU bitsandbytes needs it). On a CPU it runs at reduced
  depth (``--text-layers`` of 32, ``--vision-layers`` of 24; default 2 and 2): the model is
  written once to a temporary folder and loaded with the 4-bit quantization config, which
  is the path a real checkpoint takes. ``--full`` builds every layer (a GPU machine).
- **HuBERT-ECG base** (HuBERT base: 12 layers, 768 wide, 7-layer convolutional encoder of
  stride 320) at full depth, fp32, on 12 x 500 = 6,000 input samples (18 frames).

Extrapolation to full depth (stated in the output): every decoder/encoder layer's forward
is timed by hooks; full-depth time = (measured total - the measured layers) + the mean
measured layer x the full layer count, separately for the vision tower and the language
model. Full-depth memory = the full model's weights (its state dict sized on the meta
device, 4-bit weights at half a byte plus an fp32 scale per 64) + the activation memory
measured above the reduced model's weights (inference keeps one layer's working set, which
does not grow with depth).

Cache fill per record = the teacher's forward + turning its tokens to fp16 and writing
them to a memory-mapped .npy (what :mod:`distill.engine.teacher_cache` does). Sizes per
token option from :func:`distill.run.plan.token_option_bytes`.

    OMP_NUM_THREADS=2 python -m benchmarks.scale            # CPU, reduced depth (~5 min)
    python -m benchmarks.scale --full --batch 8             # a GPU machine, full size
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.core.vlm import visual_tokens
from distill.run.plan import (_Peak, _state_bytes, format_bytes, format_seconds, known_config,
                              token_option_bytes)
from teachers.base import quantization_config
from teachers.vlm import VLMTeacher

DATASETS = {"PTB-XL": 21_837, "MIMIC-IV-ECG": 800_000}
D_PROJ = 128  # distill.mhca.dim / distill.ot.dim defaults: the projected option's width


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class LayerClock:
    """Forward time of every module in ``layers`` (hooks), summed over calls."""

    def __init__(self, layers: list[nn.Module]):
        self.seconds = [0.0] * len(layers)
        self._start: dict[int, float] = {}
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i)))
            self._handles.append(layer.register_forward_hook(self._post(i)))

    def _pre(self, i: int):
        def hook(*_):
            _sync()
            self._start[i] = time.perf_counter()
        return hook

    def _post(self, i: int):
        def hook(*_):
            _sync()
            self.seconds[i] += time.perf_counter() - self._start[i]
        return hook

    def reset(self) -> None:
        self.seconds = [0.0] * len(self.seconds)

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _layers(module: nn.Module, suffix: str) -> list[nn.Module]:
    """The transformer layers of ``module`` (class names ending in ``suffix``)."""
    found = [m for m in module.modules() if type(m).__name__.endswith(suffix)]
    if not found:
        raise RuntimeError(f"no *{suffix} in {type(module).__name__}")
    return found


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _write_seconds(tokens: torch.Tensor, folder: Path) -> float:
    """Seconds to store one batch of tokens as the cache does (fp16 into an .npy memmap)."""
    start = time.perf_counter()
    arr = np.lib.format.open_memmap(folder / "tokens.npy", mode="w+",
                                    shape=tuple(tokens.shape), dtype=np.float16)
    arr[:] = tokens.float().cpu().numpy()
    arr.flush()
    del arr
    return time.perf_counter() - start


def _measure(forward, clocks: dict[str, LayerClock], batch: int, repeats: int,
             folder: Path) -> dict[str, Any]:
    """Warm-up, then ``repeats`` timed forwards: seconds per record in total and per layer
    group, the store time, the peak memory."""
    with torch.no_grad():
        forward()
        for c in clocks.values():
            c.reset()
        write = 0.0
        with _Peak() as peak:
            start = time.perf_counter()
            for _ in range(repeats):
                tokens = forward()
                _sync()
            total = time.perf_counter() - start
            for _ in range(repeats):
                write += _write_seconds(tokens, folder)
    n = batch * repeats
    return {"forward_s": total / n, "write_s": write / n, "peak": peak.peak,
            "layers_s": {k: [s / n for s in c.seconds] for k, c in clocks.items()},
            "tokens": list(tokens.shape[1:])}


def _extrapolate(m: dict[str, Any], full_layers: dict[str, int]) -> float:
    """Full-depth forward seconds per record (see the module docstring)."""
    measured = sum(sum(v) for v in m["layers_s"].values())
    rest = m["forward_s"] - measured
    return rest + sum(np.mean(m["layers_s"][k]) * full_layers[k] for k in full_layers)


def bench_llava(text_layers: int, vision_layers: int, batch: int, repeats: int,
                full: bool, workdir: Path) -> dict[str, Any]:
    from transformers import LlavaForConditionalGeneration

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full_cfg = known_config("llava-hf/llava-1.5-7b-hf")
    cfg = known_config("llava-hf/llava-1.5-7b-hf")
    if not full:
        cfg.text_config.num_hidden_layers = text_layers
        cfg.vision_config.num_hidden_layers = vision_layers
    depth = {"language": cfg.text_config.num_hidden_layers,
             "vision": cfg.vision_config.num_hidden_layers}
    with torch.device("meta"):
        meta_full = LlavaForConditionalGeneration(full_cfg)
    skip = VLMTeacher.quant_skip_modules
    full_weights = _state_bytes(meta_full, 4, skip)
    params_full = sum(p.numel() for p in meta_full.parameters())
    del meta_full

    # random weights, written once, loaded in 4-bit as a real checkpoint is
    folder = workdir / "llava"
    start = time.perf_counter()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    before = _rss()
    qconfig = quantization_config("4bit", skip_modules=skip)
    quant = "4-bit NF4 (bitsandbytes)"
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            folder, quantization_config=qconfig, dtype=torch.float32,
            device_map={"": device.index or 0} if device.type == "cuda" else None)
    except Exception as exc:  # bitsandbytes without a back end for this device
        quant = f"bf16 (4-bit failed here: {type(exc).__name__}: {str(exc)[:80]})"
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        model.to(device)
    build_s = time.perf_counter() - start
    model.eval()
    loaded = _rss() - before
    reduced_weights = _state_bytes(model, 0, []) if "4-bit" in quant else None
    n_img = cfg.image_seq_length
    prompt = 16  # "USER: <image>\nClassify this 12-lead ECG. ASSISTANT:" in Llama tokens
    ids = torch.full((batch, n_img + prompt), 1, dtype=torch.long)
    ids[:, 5:5 + n_img] = cfg.image_token_index
    pixels = torch.randn(batch, 3, 336, 336)
    ids, pixels = ids.to(device), pixels.to(device)
    inner = model.model

    def forward() -> torch.Tensor:
        out = inner(input_ids=ids, pixel_values=pixels, return_dict=True)
        return visual_tokens(out, batch, n_img, cfg.text_config.hidden_size)  # as VLMTeacher

    clocks = {"language": LayerClock(_layers(inner.language_model, "DecoderLayer")),
              "vision": LayerClock(_layers(inner.vision_tower, "EncoderLayer"))}
    m = _measure(forward, clocks, batch, repeats, workdir)
    for c in clocks.values():
        c.close()
    full_layers = {"language": full_cfg.text_config.num_hidden_layers,
                   "vision": full_cfg.vision_config.num_hidden_layers}
    m.update(name="LLaVA-1.5-7B (vision tokens)", quant=quant, depth=depth,
             full_depth=full_layers, build_s=build_s, params_full=params_full,
             weights_full=full_weights, device=str(device),
             forward_full_s=m["forward_s"] if full else _extrapolate(m, full_layers))
    if device.type == "cuda":
        m["memory_full"] = m["peak"] + (full_weights - (reduced_weights or 0)) * (not full)
    else:
        activations = max(m["peak"] - before - loaded, 0)
        m["memory_full"] = full_weights + activations
        m["activations"] = activations
    return m


def bench_hubert(batch: int, repeats: int, workdir: Path) -> dict[str, Any]:
    from transformers import HubertModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = known_config("Edoardo-BS/hubert-ecg-base")
    torch.manual_seed(0)
    before = _rss()
    start = time.perf_counter()
    model = HubertModel(cfg).eval().to(device)
    build_s = time.perf_counter() - start
    x = torch.randn(batch, 12 * 500, device=device)  # 12 leads x 5 s at 100 Hz, concatenated

    def forward() -> torch.Tensor:
        return model(input_values=x).last_hidden_state

    clocks = {"encoder": LayerClock(_layers(model.encoder, "EncoderLayer"))}
    m = _measure(forward, clocks, batch, repeats, workdir)
    clocks["encoder"].close()
    weights = _state_bytes(model, 0, [])
    m.update(name="HuBERT-ECG base (frames)", quant="fp32", depth={"encoder": 12},
             full_depth={"encoder": 12}, build_s=build_s,
             params_full=sum(p.numel() for p in model.parameters()), weights_full=weights,
             device=str(device), forward_full_s=m["forward_s"],
             memory_full=m["peak"] if device.type == "cuda" else m["peak"] - before)
    return m


def table(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        n_t, d = r["tokens"]
        opts = token_option_bytes(n_t, d, d_proj=D_PROJ)
        fill = r["forward_full_s"] + r["write_s"]
        depth = ", ".join(f"{k} {r['depth'][k]}/{r['full_depth'][k]}" for k in r["depth"])
        lines += [f"### {r['name']}: {r['params_full'] / 1e6:,.0f} M parameters, {r['quant']}, "
                  f"on {r['device']}",
                  f"measured at depth {depth}; forward {format_seconds(r['forward_s'])}/record "
                  f"(batch {r['batch']}), full depth "
                  f"{format_seconds(r['forward_full_s'])}/record; cache write "
                  f"{format_seconds(r['write_s'])}/record; peak memory at full depth "
                  f"{format_bytes(r['memory_full'])} (weights {format_bytes(r['weights_full'])})",
                  f"tokens {n_t} x {d}; bytes per record: " + ", ".join(
                      f"{k} {format_bytes(v)}" for k, v in opts.items()),
                  "",
                  "| data set | records | cache fill (this machine) | fp16 | projected (d=128) "
                  "| lead-pooled | int8 + scales |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, n in DATASETS.items():
            lines.append(f"| {name} | {n:,} | {format_seconds(fill * n)} | "
                         + " | ".join(format_bytes(opts[k] * n) for k in
                                      ("fp16", "projected", "lead-pooled", "int8")) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text-layers", type=int, default=2, help="LLaVA language layers (of 32)")
    p.add_argument("--vision-layers", type=int, default=2, help="CLIP layers (of 24)")
    p.add_argument("--full", action="store_true", help="every layer (a GPU machine)")
    p.add_argument("--batch", type=int, default=1, help="records per forward (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed forwards (default 2)")
    p.add_argument("--hubert-batch", type=int, default=16)
    p.add_argument("--skip-llava", action="store_true")
    p.add_argument("--out", default=None, help="also write the measurements as JSON here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    results = []
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="ecg-distill-scale-") as tmp:
        work = Path(tmp)
        h = bench_hubert(args.hubert_batch, args.repeats, work)
        h["batch"] = args.hubert_batch
        results.append(h)
        if not args.skip_llava:
            v = bench_llava(args.text_layers, args.vision_layers, args.batch, args.repeats,
                            args.full, work)
            v["batch"] = args.batch
            results.append(v)
    wall = time.perf_counter() - start
    machine = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
               else f"CPU, {threads} thread(s) (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    print(f"## Costs at scale (random weights, {machine})\n")
    print(table(results))
    print(f"wall time {wall:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine, "wall_s": wall,
                                              "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
