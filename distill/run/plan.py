"""The ``plan`` command: what a recipe will cost, per stage, before it runs.

For every stage of ``ecg-distill run`` the plan gives the time, the peak memory and the
disk it writes, for the recipe's own data set and extrapolated linearly to N records.

How each number is obtained (printed beside it):

- **measured**: a few batches of the stage's real code path on this machine (the
  teacher's forward for the cache, a training step of the teacher and of every student
  built by the same job builders ``run`` uses); seconds per record, times the records
  (and epochs). The peak memory is the process's resident set (sampled while the batches
  run) or, on a GPU, ``torch.cuda.max_memory_allocated``.
- **FLOPs**: a teacher that cannot be built here (a hub id not downloaded; there may be no
  network) is instantiated from its configuration on the meta device (no weights, no
  memory): its parameter count and output shapes are exact, its time is its forward FLOPs
  (2 x parameters x tokens, plus attention) at this machine's measured matrix-multiply
  rate, and its memory is its weights (4-bit: half a byte per quantized weight plus the
  block scales) plus an activation estimate.
- **exact**: disk sizes from the arrays each stage writes (the teacher cache's ``.npy``
  files, the signal and image caches), which do not depend on the values.

The teacher cache's size for each way of storing the tokens is
:func:`token_option_bytes` (one function, for every caller).

``run`` calls :func:`check_disk` before each stage: a stage whose disk estimate exceeds the
free space is refused with one line saying how much it needs and how to reduce it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from distill.core.errors import DataError, ECGDistillError, RecipeError
from distill.core.leads import NUM_LEADS
from distill.data.load import cache_root, data_folder, render_config, synthetic_folder
from distill.data.render import patch_lead_map, render_batch
from distill.engine.factory import build_student, build_teacher, reads_images, student_name
from distill.engine.jobs import (ablation_recipe, augment_draws, baseline_job, code_levels,
                                 distill_job, load_frozen_teacher, load_job_data, teacher_inputs,
                                 teacher_job, teacher_runs_live)
from distill.engine.teacher_cache import TeacherOutputs
from distill.losses import loss_family
from distill.recipe import Recipe
from teachers import zoo
from teachers.signal import frame_leads
from teachers.tiny import TINY_NAMES, resolve_tiny
from teachers.vlm import VLMTeacher

__all__ = ["KNOWN_CONFIGS", "Plan", "StageEstimate", "TeacherShapes", "cache_entry_bytes",
           "check_disk", "format_bytes", "format_plan", "format_seconds", "free_bytes",
           "known_config", "plan_recipe", "projection_width", "stage_disk_need",
           "teacher_shapes", "token_option_bytes"]

NPY_HEADER = 128  # bytes of a .npy file's header (format 1.0, padded to 64; these shapes)
CODE_TOP = 16  # the cache's top codes per code distribution (teacher_cache.CODE_TOP)


# ---------------------------------------------------------------- formatting


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


# ---------------------------------------------------------------- token storage options


def token_option_bytes(tokens: int, dim: int, *, d_proj: int | None,
                       leads: int = NUM_LEADS) -> dict[str, int]:
    """Bytes per record of the cached teacher tokens [tokens, dim], for each storage option
    of ``distill.cached_tokens`` (:class:`distill.engine.teacher_cache.TokenFormat`):

    - ``fp16``: as the teacher gives them, tokens x dim x 2;
    - ``projected``: after the ``ot`` term's fixed map (layer norm, then a fixed [d_proj,
      dim] matrix), tokens x d_proj x 2 (None when ``ot`` is not weighted);
    - ``lead_mean``: one token per lead (the mean of the lead's layer-normalised tokens,
      what ot's lead pooling matches), leads x dim x 2;
    - ``int8``: int8 values with one float32 scale per token, tokens x dim + tokens x 4.
    """
    return {"fp16": tokens * dim * 2,
            "projected": None if d_proj is None else tokens * d_proj * 2,
            "lead_mean": leads * dim * 2,
            "int8": tokens * dim + tokens * 4}


TOKEN_OPTION_TEXT = {
    "fp16": "tokens x dim x 2 B (the default)",
    "projected": "tokens x d x 2 B, d the ot term's dim (mhca off)",
    "lead_mean": "12 leads x dim x 2 B (ot's lead pooling; mhca off)",
    "int8": "tokens x dim x 1 B + one float32 scale per token",
}


def projection_width(recipe: Recipe) -> int | None:
    """The width d of ``cached_tokens: projected``: the ``ot`` term's ``dim`` (its fixed
    map of the teacher tokens is what the option stores); None when ot is not weighted."""
    d = recipe.distill
    if d.alpha > 0 and d.weights.get("ot", 0.0) > 0:
        return int(loss_family("ot").make_config(d.losses.get("ot")).dim)
    return None


# ---------------------------------------------------------------- the teacher's outputs


@dataclass(frozen=True)
class TeacherShapes:
    """What the teacher gives per record (the arrays the cache stores)."""

    tokens: int  # N_t
    dim: int  # D_t
    pooled: int  # D of the pooled embedding
    classes: int  # C
    token_mask: bool = False  # a [N_t] bool mask is stored
    code_levels: int = 0  # K levels of top-16 code distributions stored
    token_leads: tuple[int, ...] = ()  # the lead of each token (-1: none)
    source: str = ""  # how the shapes were found
    parameters: int | None = None  # the teacher's parameter count


def cache_entry_bytes(shapes: TeacherShapes, records: int, storage: str = "fp16",
                      d_proj: int | None = None) -> dict[str, int]:
    """Bytes of each file of one teacher-cache entry of ``records`` records
    (:mod:`distill.engine.teacher_cache`), the tokens stored as ``storage`` (fp32, or a key
    of :func:`token_option_bytes`; ``d_proj`` for projected)."""
    f = 4 if storage == "fp32" else 2
    per = {"logits": 4 * shapes.classes, "pooled": f * shapes.pooled}
    fixed: dict[str, int] = {}
    stored_tokens = shapes.tokens
    if storage in ("fp16", "fp32"):
        per["tokens"] = f * shapes.tokens * shapes.dim
    elif storage == "int8":
        per["tokens"] = shapes.tokens * shapes.dim
        per["token_scale"] = 4 * shapes.tokens
    elif storage == "projected":
        d = d_proj or shapes.dim
        per["tokens"] = 2 * shapes.tokens * d
        fixed["projection.npy"] = NPY_HEADER + 4 * d * shapes.dim
    elif storage == "lead_mean":
        stored_tokens = len({v for v in shapes.token_leads if v >= 0}) or NUM_LEADS
        per["tokens"] = 2 * stored_tokens * shapes.dim
    else:
        raise ValueError(f"unknown token storage {storage!r}")
    if shapes.token_mask or storage == "lead_mean":
        per["token_mask"] = stored_tokens
    if shapes.code_levels:
        per["code_idx"] = 2 * shapes.tokens * shapes.code_levels * CODE_TOP
        per["code_logp"] = 2 * shapes.tokens * shapes.code_levels * CODE_TOP
    out = {f"{k}.npy": NPY_HEADER + records * v for k, v in per.items()}
    out.update(fixed)
    meta = {"key": "x" * 20, "records": records, "token_leads": list(shapes.token_leads)
            or [0] * shapes.tokens, "storage": "float16", "version": 1}
    out["meta.json"] = len(json.dumps(meta, indent=1))
    return out


# Configurations of the teachers the shipped recipes name, written out from their published
# config.json files, for a plan made where they are not downloaded (there may be no
# network): shapes and parameter counts come from them on the meta device.
def _llava_1_5_7b() -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14,
                              projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=32001,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000,
                       projector_hidden_act="gelu", vision_feature_layer=-2,
                       vision_feature_select_strategy="default", image_seq_length=576,
                       tie_word_embeddings=False)


def _hubert_base() -> Any:
    from transformers import HubertConfig

    # HuBERT base (transformers' defaults: 12 layers, 768 wide, 12 heads, 3072 MLP, the
    # 7-layer convolutional feature encoder of stride 320); HuBERT-ECG base is this
    # architecture (its own config.json is the custom "hubert_ecg" type)
    return HubertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072)


KNOWN_CONFIGS: dict[str, Callable[[], Any]] = {
    "llava-hf/llava-1.5-7b-hf": _llava_1_5_7b,
    "Edoardo-BS/hubert-ecg-base": _hubert_base,
}


def known_config(name: str) -> Any | None:
    fn = KNOWN_CONFIGS.get(name)
    return None if fn is None else fn()


def _local_source(kind: str, name_or_path: str) -> Path | None:
    """The local folder a teacher's backbone loads from (a tiny preset, a shipped teacher,
    a folder, or a hub id already in the Hugging Face cache), else None."""

    if str(name_or_path) in TINY_NAMES.get(kind, {}):
        return Path(resolve_tiny(kind, name_or_path))
    shipped = zoo.backbone_folder(name_or_path)
    if shipped is not None:
        return shipped
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(name_or_path), "config.json")
    except Exception:  # not a repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def teacher_config(recipe: Recipe) -> tuple[Any | None, str]:
    """(the teacher backbone's transformers configuration, where it came from)."""
    from transformers import AutoConfig

    t = recipe.teacher
    local = _local_source(t.kind, t.name_or_path)
    if local is not None:
        cfg_dir = local / "backbone" if (local / "backbone" / "config.json").is_file() else local
        if (cfg_dir / "config.json").is_file():
            try:
                return AutoConfig.from_pretrained(str(cfg_dir),
                                                  trust_remote_code=t.trust_remote_code), \
                    f"configuration of {cfg_dir}"
            except (OSError, ValueError):
                pass
    cfg = known_config(t.name_or_path)
    if cfg is not None:
        return cfg, f"{t.name_or_path}'s published configuration (not downloaded here)"
    return None, ""


def _analytic_shapes(recipe: Recipe, classes: int) -> TeacherShapes | None:
    """The teacher's output shapes from its configuration alone (vlm and signal kinds)."""

    if code_levels(recipe):
        return None  # a tokenized teacher: probed
    config, source = teacher_config(recipe)
    if config is None:
        return None
    t = recipe.teacher
    if hasattr(config, "vision_config") and hasattr(config, "image_seq_length"):  # LLaVA
        n = int(getattr(config, "image_seq_length", 0) or 0)
        size = int(config.vision_config.image_size)
        cls = config.vision_feature_select_strategy == "full"
        grid = math.isqrt(n - cls) if n else 0
        if not n or grid * grid != n - cls or size % grid:
            return None
        leads = patch_lead_map(dataclasses.replace(render_config(recipe.data), height=size,
                                                   width=size), size // grid).tolist()
        leads = ([-1] if cls else []) + [int(v) for v in leads]
        d = int(config.text_config.hidden_size)
        return TeacherShapes(tokens=n, dim=d, pooled=d, classes=classes,
                             token_leads=tuple(leads), source=source)
    if hasattr(config, "conv_stride") and hasattr(config, "conv_kernel"):  # HuBERT

        segment = round(float(getattr(t, "seconds", 5.0) or 5.0) * 100.0)
        leads = frame_leads(NUM_LEADS * segment, segment, list(config.conv_kernel),
                            list(config.conv_stride)).tolist()
        d = int(config.hidden_size)
        return TeacherShapes(tokens=len(leads), dim=d, pooled=d, classes=classes,
                             token_leads=tuple(leads), source=source)
    return None


def _probe_shapes(teacher: nn.Module, classes: int, how: str) -> TeacherShapes:
    """The shapes of one real forward of ``teacher`` on its example inputs."""
    device = next(teacher.parameters()).device
    with torch.no_grad():
        inputs = teacher.example_inputs(1, torch.Generator().manual_seed(0))
        out = teacher.eval()(**{k: v.to(device) for k, v in inputs.items()})
    levels = 0 if out.code_logits is None else int(out.code_logits.shape[2])
    return TeacherShapes(tokens=int(out.tokens.shape[1]), dim=int(out.tokens.shape[2]),
                         pooled=int(out.pooled.shape[-1]), classes=classes,
                         token_mask=out.token_mask is not None, code_levels=levels,
                         token_leads=tuple(int(v) for v in out.token_leads.tolist()),
                         source=how,
                         parameters=sum(p.numel() for p in teacher.parameters()))


def teacher_shapes(recipe: Recipe, classes: int,
                   build: Callable[[], nn.Module] | None = None) -> TeacherShapes:
    """The teacher's output shapes: from its configuration (vlm, signal), else from one
    forward of the teacher ``build()`` gives (RecipeError when neither is possible)."""
    shapes = _analytic_shapes(recipe, classes)
    if shapes is not None:
        return shapes
    if build is None:
        raise RecipeError(f"teacher.name_or_path: cannot read {recipe.teacher.name_or_path}'s "
                          f"configuration here to size its outputs")
    return _probe_shapes(build(), classes, "one forward of the teacher")


# ---------------------------------------------------------------- data sizes


def record_count(recipe: Recipe) -> int:
    """Records of the recipe's data set, without loading it: the synthetic default's count,
    or the rows of ptbxl_database.csv (the .hea files of a CinC folder)."""
    data = recipe.data
    if data.path is None:
        return int(data.synthetic.records)
    folder = Path(data.path).expanduser()
    if not folder.is_dir():  # the data stage's own one-line error
        raise DataError(f"data.path: folder {folder} does not exist")
    if data.format == "cinc":
        return sum(1 for _ in folder.rglob("*.hea"))
    csv = folder / "ptbxl_database.csv"
    if not csv.is_file():
        raise DataError(f"data.path: {csv} does not exist")
    import pandas as pd

    return int(len(pd.read_csv(csv, usecols=["ecg_id"])))


def data_bytes_per_record(recipe: Recipe) -> dict[str, int]:
    """Bytes per record the data stage writes: the decoded signals (float32 [12, T] at the
    recipe's rate), the rendered printouts (uint8 [3, H, W]) when a model reads them, and
    the synthetic default's WFDB files (int16 per lead and sample at each rate)."""

    data = recipe.data
    out = {"signals": 4 * NUM_LEADS * 10 * int(data.sampling_rate)}
    if reads_images(recipe):
        out["images"] = 3 * int(data.image.height) * int(data.image.width)
    if data.path is None:

        if not (synthetic_folder(data) / "ptbxl_database.csv").is_file():
            out["synthetic records"] = sum(2 * NUM_LEADS * 10 * r + 1100
                                           for r in data.synthetic.rates)
    return out


# ---------------------------------------------------------------- estimates


@dataclass
class StageEstimate:
    """One stage's cost: a fixed part and a part per record, each for time and disk."""

    stage: str
    seconds_per_record: float | None = None  # all epochs included
    seconds_fixed: float = 0.0
    memory: int | None = None  # peak bytes
    disk_per_record: float = 0.0
    disk_fixed: float = 0.0
    how: str = ""
    notes: list[str] = field(default_factory=list)

    def seconds(self, n: int) -> float | None:
        if self.seconds_per_record is None:
            return None
        return self.seconds_fixed + self.seconds_per_record * n

    def disk(self, n: int) -> float:
        return self.disk_fixed + self.disk_per_record * n


@dataclass
class Plan:
    recipe: Recipe
    records: int  # the recipe's data set
    target: int  # extrapolated to
    machine: str
    shapes: TeacherShapes
    stages: list[StageEstimate]
    token_options: dict[str, int | None]  # bytes per record
    d_proj: int | None
    cache_copies: int  # entries per record: augmentation draws (1 without)
    lines: list[str] = field(default_factory=list)  # what was measured how


class _Peak:
    """The peak memory while the block runs: resident set size sampled every 5 ms (CPU)
    or the CUDA allocator's peak."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> _Peak:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        if torch.cuda.is_available():
            self.peak = int(torch.cuda.max_memory_allocated())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(step: Callable[[Any], int], batches: Iterable[Any], n: int) -> float:
    """Seconds per record of ``step(batch)`` (which returns the batch's records) over up to
    ``n`` batches after one warm-up batch (the warm-up alone when there is only one)."""
    seconds, records, first = 0.0, 0, None
    for i, batch in enumerate(batches):
        if i > n:
            break
        start = time.perf_counter()
        b = step(batch)
        _sync()
        took = time.perf_counter() - start
        if i == 0:
            first = (took, b)
            continue
        seconds += took
        records += b
    if records == 0:
        if first is None:
            raise ECGDistillError("plan: no batch to measure (the split is empty)")
        seconds, records = first
    return seconds / records


def _matmul_rate(device: torch.device) -> float:
    """This machine's matrix-multiply rate (FLOP/s) in the dtype a teacher runs in."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        a @ b
        reps += 1
    _sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def _state_bytes(model: nn.Module, quant_bits: int, skip: Iterable[str]) -> int:
    """Bytes of ``model``'s weights with its Linear layers outside ``skip`` stored at
    ``quant_bits`` (4: NF4 with an fp32 scale per 64 weights; 8: LLM.int8 with an fp32
    scale per row; 0: as they are)."""
    import re

    skip = [re.compile(s) for s in skip]
    total = 0
    quantized: set[str] = set()
    if quant_bits:
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and not any(s.fullmatch(name) or s.match(name)
                                                   for s in skip):
                w = m.weight
                total += (w.numel() // 2 + w.numel() // 64 * 4 if quant_bits == 4
                          else w.numel() + w.shape[0] * 4)
                quantized.add(f"{name}.weight")
    for name, t in model.state_dict().items():
        if name not in quantized:
            total += t.numel() * t.element_size()
    return total


def _meta_vlm(recipe: Recipe, config: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The recipe's VLM backbone on the meta device (no memory) and its dimensions."""
    from transformers import AutoModelForImageTextToText

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        getattr(recipe.teacher, "dtype", "float32"), torch.float32)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, torch_dtype=dtype)
    return model, {"dtype": dtype}


def _vlm_flops(config: Any, prompt_tokens: int) -> tuple[float, int]:
    """(forward FLOPs per record, the sequence length): 2 x weights x tokens for the
    vision tower (image tokens + CLS), the projector and the language model (prompt with
    the image tokens), plus attention's 4 x layers x seq^2 x width; the vocabulary head is
    not run (the teacher reads hidden states)."""
    v, tx = config.vision_config, config.text_config
    n_img = int(config.image_seq_length)
    v_seq = (v.image_size // v.patch_size) ** 2 + 1
    v_w = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
    vision = 2 * v.num_hidden_layers * v_seq * v_w + 4 * v.num_hidden_layers * v_seq ** 2 * v.hidden_size
    proj = 2 * n_img * (v.hidden_size * tx.hidden_size + tx.hidden_size ** 2)
    seq = n_img + prompt_tokens
    kv = tx.hidden_size * getattr(tx, "num_key_value_heads", tx.num_attention_heads) \
        // tx.num_attention_heads
    t_w = 2 * tx.hidden_size ** 2 + 2 * tx.hidden_size * kv + 3 * tx.hidden_size * tx.intermediate_size
    text = 2 * tx.num_hidden_layers * seq * t_w + 4 * tx.num_hidden_layers * seq ** 2 * tx.hidden_size
    return float(vision + proj + text), seq


def _vlm_activations(config: Any, seq: int, batch: int, training: bool, dtype_bytes: int) -> int:
    """Activation memory of a batch. Inference: one layer's working set, batch x seq x
    (4 x width + 2 x MLP width) values, plus batch x heads x seq^2 attention scores.
    Training without activation checkpointing: every layer keeps batch x seq x
    (34 x width + 5 x heads x seq) bytes (Korthikanti et al. 2022, 16-bit activations)."""
    tx = config.text_config
    h, heads, layers = tx.hidden_size, tx.num_attention_heads, tx.num_hidden_layers
    if training:
        return int(layers * batch * seq * (34 * h + 5 * heads * seq) * dtype_bytes / 2)
    return int(batch * seq * (4 * h + 2 * tx.intermediate_size) * dtype_bytes
               + batch * heads * seq * seq * dtype_bytes)


# ---------------------------------------------------------------- the plan


def _checkpoint_bytes(state: int, trainable: int, keep: int) -> int:
    """A training job's folder: ``keep`` checkpoints (the model's state, AdamW's two fp32
    moments of every trainable weight) and best/ (the model)."""
    return keep * (state + 8 * trainable) + state


def _train_loop(job: Any, batch_size: int, device: torch.device, n: int
                ) -> tuple[float, float, int]:
    """(training seconds per record, validation seconds per record, peak memory) of a few
    batches of ``job`` (its model, its loss, AdamW)."""
    model = job.model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def to(batch):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def step(batch) -> int:
        loss, _ = job.loss_fn(model, to(batch))
        if opt is not None:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return len(batch["labels"])

    def evaluate(batch) -> int:
        with torch.no_grad():
            job.logits_fn(model.eval(), to(batch))
        return len(batch["labels"])

    with _Peak() as peak:
        train = _timed(step, DataLoader(job.train_set, batch_size=batch_size, shuffle=True,
                                        generator=torch.Generator().manual_seed(0)), n)
        val = _timed(evaluate, DataLoader(job.val_set, batch_size=batch_size), n)
    model.train()
    return train, val, peak.peak


def _count(model: nn.Module) -> tuple[int, int]:
    """(bytes of the state dict, trainable parameters)."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return state, sum(p.numel() for p in model.parameters() if p.requires_grad)


def _stand_in_cache(shapes: TeacherShapes, n: int, logits: np.ndarray | None = None) -> Any:
    """Teacher outputs of the right shapes for ``n`` records without their memory: one
    random record broadcast to all (the students' training reads them exactly as it reads
    the cache)."""

    rng = np.random.default_rng(0)

    def rows(shape, dtype):
        one = rng.standard_normal(shape).astype(dtype)
        return np.broadcast_to(one, (n, *shape))

    extra = {}
    if shapes.token_mask:
        extra["token_mask"] = np.broadcast_to(np.ones(shapes.tokens, bool), (n, shapes.tokens))
    return TeacherOutputs(folder=Path("."), key="plan", logits=rows((shapes.classes,), np.float32),
                          tokens=rows((shapes.tokens, shapes.dim), np.float16),
                          pooled=rows((shapes.pooled,), np.float16),
                          token_leads=torch.tensor(shapes.token_leads or [0] * shapes.tokens),
                          **extra)


def plan_recipe(recipe: Recipe, records: int | None = None, batches: int = 2,
                progress: bool = False, log: Callable[[str], None] = lambda s: None) -> Plan:
    """Measure and estimate every stage of ``recipe`` (see the module docstring).

    Args:
        recipe: the resolved recipe.
        records: extrapolate to this many records (default the recipe's own count).
        batches: batches timed per measurement (after one warm-up batch).
        progress: progress bars while loading the data.
        log: called with a line as each part is measured.
    """

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = (torch.cuda.get_device_name(0) if device.type == "cuda"
               else f"CPU, {torch.get_num_threads()} thread(s)")
    per_data = data_bytes_per_record(recipe)  # (before the synthetic default is generated)
    log("loading the data (decoded and rendered once, cached for the run)")
    with _Peak() as data_peak:
        jd = load_job_data(recipe, progress=progress)
    n = len(jd.data.ecg_ids)
    target = records or n
    splits = {s: len(ix) for s, ix in jd.data.splits.items()}
    share = {s: splits.get(s, 0) / n for s in ("train", "val", "test")}
    classes = len(jd.classes)
    t = recipe.teacher
    stages: list[StageEstimate] = []
    lines: list[str] = []

    # data: decoding (read back a few records) and rendering, measured
    est = StageEstimate("data", how="measured")
    per = per_data
    est.disk_per_record = sum(per.values())
    est.memory = data_peak.peak

    sig = np.stack([jd.data.signal(i) for i in range(min(8, n))]).astype(np.float32)
    start = time.perf_counter()
    if reads_images(recipe):

        render_batch(sig, jd.data.sampling_rate, render_config(recipe.data))
    render = (time.perf_counter() - start) / len(sig)
    decode = _decode_seconds(jd.data, recipe)
    est.seconds_per_record = render + decode
    est.notes.append(f"per record: decode {format_seconds(decode)}, render "
                     f"{format_seconds(render)}; writes " + ", ".join(
                         f"{k} {format_bytes(v)}" for k, v in per.items()))
    stages.append(est)

    # the teacher: built here when its weights are here, else its configuration on meta
    config, cfg_source = teacher_config(recipe)
    local = _local_source(t.kind, t.name_or_path) is not None
    teacher = None
    if local:
        log(f"building the teacher {t.name_or_path}")
        teacher = build_teacher(recipe, jd.classes)
        shapes = _analytic_shapes(recipe, classes) or _probe_shapes(
            teacher, classes, "one forward of the teacher")
        shapes = dataclasses.replace(shapes, parameters=sum(p.numel() for p in
                                                            teacher.parameters()))
    elif config is not None and hasattr(config, "vision_config"):  # a LLaVA configuration
        shapes = _analytic_shapes(recipe, classes)
    else:
        raise RecipeError(f"teacher.name_or_path: {t.name_or_path} is neither here nor a "
                          f"configuration the plan knows ({', '.join(KNOWN_CONFIGS)}); "
                          f"download it or point teacher.name_or_path at a local folder")
    draws = augment_draws(recipe) or 1
    live = teacher_runs_live(recipe)
    t_batch = t.batch_size or recipe.train.batch_size
    teacher_train = StageEstimate("teacher")
    cache = StageEstimate("teacher_cache")
    if teacher is not None:
        shapes_src = shapes.source
        lines.append(f"teacher {t.kind} {t.name_or_path}: built here, "
                     f"{shapes.parameters:,} parameters; shapes from {shapes_src}")
        teacher.to(device)
        inputs = teacher_inputs(recipe)
        views = {"teacher": jd.views["teacher"]}
        images = jd.images if jd.teacher_class.reads_images() else None
        ds = jd.data.split("all", views, extras={"image": images} if images is not None else None)

        def forward(batch) -> int:
            with torch.no_grad():
                teacher(**{k: v.to(device) for k, v in inputs(batch).items()})
            return len(batch["index"])

        log("timing the teacher's forward (teacher cache)")
        teacher.eval()
        with _Peak() as peak:
            cache.seconds_per_record = _timed(forward, DataLoader(ds, batch_size=t_batch),
                                              batches) * draws
        cache.memory = peak.peak
        cache.how = "measured"
        if t.train_mode != "frozen":
            log("timing the teacher's training steps")
            job = teacher_job(jd)
            tr, va, mem = _train_loop(job, t_batch, device, batches)
            epochs = t.epochs if t.epochs is not None else recipe.train.epochs
            teacher_train.seconds_per_record = epochs * (tr * share["train"] + va * share["val"])
            teacher_train.memory = mem
            teacher_train.how = "measured"
            state, trainable = _count(job.model)
            teacher = job.model  # (trained a few steps: its cost, not its weights, matter)
    else:
        meta, _ = _meta_vlm(recipe, config)
        shapes = dataclasses.replace(shapes, parameters=sum(p.numel() for p in meta.parameters()))
        lines.append(f"teacher {t.kind} {t.name_or_path}: {cfg_source}, instantiated on the "
                     f"meta device: {shapes.parameters:,} parameters")

        bits = {"4bit": 4, "8bit": 8}.get(t.load_in, 0)
        weights = _state_bytes(meta, bits, VLMTeacher.quant_skip_modules or [])
        dtype_bytes = 2 if getattr(t, "dtype", "float32") in ("bfloat16", "float16") else 4
        prompt = len(t.prompt.split()) * 2 + 8  # a generous token count for the prompt text
        flops, seq = _vlm_flops(config, prompt)
        rate = _matmul_rate(device)
        lines.append(f"  forward: {flops / 1e12:.2f} TFLOP per record (sequence of {seq} "
                     f"tokens); this machine multiplies matrices at {rate / 1e9:.0f} GFLOP/s; "
                     f"weights {format_bytes(weights)} ({t.load_in})")
        cache.seconds_per_record = flops / rate * draws
        cache.memory = weights + _vlm_activations(config, seq, t_batch, False, dtype_bytes)
        cache.how = "FLOPs"
        trainable = 0
        if t.train_mode != "frozen":
            tx = config.text_config
            if t.train_mode == "lora":  # rank r on q, k, v, o, gate, up, down of every layer
                kv = tx.hidden_size * tx.num_key_value_heads // tx.num_attention_heads
                per_layer = t.lora_rank * (4 * tx.hidden_size + 2 * (tx.hidden_size + kv)
                                           + 3 * (tx.hidden_size + tx.intermediate_size))
                trainable = per_layer * tx.num_hidden_layers
                factor = 2.0  # forward + the activations' gradients (frozen weights: none)
            elif t.train_mode == "full":
                trainable, factor = shapes.parameters, 3.0
            else:  # head: the backbone's forward only
                factor = 1.0
            epochs = t.epochs if t.epochs is not None else recipe.train.epochs
            per = factor * flops / rate
            teacher_train.seconds_per_record = epochs * (per * share["train"]
                                                         + flops / rate * share["val"])
            act = _vlm_activations(config, seq, t_batch, t.train_mode != "head", dtype_bytes)
            teacher_train.memory = weights + 16 * trainable + act
            teacher_train.how = "FLOPs"
            teacher_train.notes.append(f"{trainable:,} trainable parameters; activations "
                                       f"{format_bytes(act)} at batch {t_batch} (no activation "
                                       f"checkpointing; teacher.batch_size scales them)")
        state = weights
    if t.train_mode == "frozen":
        teacher_train.how = "nothing to do (frozen)"
        teacher_train.seconds_per_record = 0.0
    else:
        saved = {"lora": 4 * trainable, "head": 0, "full": state}.get(t.train_mode, state)
        teacher_train.disk_fixed = recipe.train.keep_checkpoints * (state + 8 * trainable) + \
            saved + 4 * (classes * shapes.pooled + classes)
    stages.append(teacher_train)
    entry = cache_entry_bytes(shapes, 1, recipe.distill.cached_tokens,
                              projection_width(recipe))
    base = cache_entry_bytes(shapes, 0, recipe.distill.cached_tokens, projection_width(recipe))
    per_record = sum(entry.values()) - sum(base.values())
    fixed = sum(base.values())
    if live:
        cache = StageEstimate("teacher_cache", seconds_per_record=0.0,
                              how="none: the teacher runs live (train.augment)")
    else:
        cache.disk_per_record = per_record * draws
        cache.disk_fixed = fixed * draws
        cache.notes.append(f"{shapes.tokens} tokens x {shapes.dim} in fp16 per record"
                           + (f", {draws} augmented views" if draws > 1 else ""))
    stages.append(cache)

    # the students: a few steps of the real jobs (distillation reads stand-in teacher
    # outputs of the teacher's shapes, as it reads the cache)
    stand_in = _stand_in_cache(shapes, n)
    dummy = teacher if teacher is not None and live else _NoTeacher()
    kinds = [("baseline", None), ("distill", None)]
    if recipe.ablations.runs:
        kinds.append(("ablation", None))
    per_job: dict[str, list[tuple[float, float, int, int, int]]] = {k: [] for k, _ in kinds}
    s_batch = recipe.train.batch_size
    for kind, _ in kinds:
        if kind == "ablation":
            spec = recipe.students[recipe.ablations.student]
            jobs = [(f"{name} {student_name(spec)}", spec, ablation_recipe(recipe, name))
                    for name in recipe.ablations.runs]
        else:
            jobs = [(student_name(s), s, recipe) for s in recipe.students]
        for name, spec, r in jobs:
            log(f"timing {kind} {name}")
            if kind == "baseline":
                job = baseline_job(jd, spec)
            else:
                job = distill_job(dataclasses.replace(jd, recipe=r), spec, dummy,
                                  None if live else stand_in)
            tr, va, mem = _train_loop(job, s_batch, device, batches)
            st, trainable = _count(job.model)
            epochs = spec.epochs if spec.epochs is not None else recipe.train.epochs
            own = _count(getattr(job.model, "student", job.model))[0]  # the student alone
            per_job[kind].append((epochs * (tr * share["train"] + va * share["val"]), va, mem,
                                  _checkpoint_bytes(st, trainable,
                                                    recipe.train.keep_checkpoints), own))
    eval_per_record = 0.0
    for kind, _ in kinds:
        jobs = per_job[kind]
        stages.append(StageEstimate(
            kind, seconds_per_record=sum(j[0] for j in jobs), memory=max(j[2] for j in jobs),
            disk_fixed=sum(j[3] for j in jobs), how="measured",
            notes=[f"{len(jobs)} job(s), all {recipe.train.epochs} epochs (early stopping "
                   f"can end them sooner)"]))
        eval_per_record += sum(j[1] for j in jobs)
    # evaluate: every model's forward over the test fold (the teacher's too), bootstrap
    # resampling excluded
    teacher_eval = (cache.seconds_per_record or 0.0) / draws if not live else 0.0
    stages.append(StageEstimate("evaluate", seconds_per_record=(eval_per_record + teacher_eval)
                                * share["test"], how="measured (forward passes)",
                                memory=max([cache.memory or 0] + [j[2] for v in per_job.values()
                                                                   for j in v]),
                                disk_per_record=4 * classes * (sum(len(v) for v in per_job.values()) + 1)
                                * share["test"]))
    # quantize: every baseline and distilled student in every format (each scored on the
    # test fold; its size at most the fp32 student's); export: the distilled ones
    formats = list(getattr(recipe.quantize, "formats", []) or [])
    trained = per_job["baseline"] + per_job["distill"]
    stages.append(StageEstimate(
        "quantize", seconds_per_record=sum(j[1] for j in trained) * share["test"] * len(formats),
        disk_fixed=sum(j[4] for j in trained) * len(formats), how="forward passes per format",
        notes=[f"{len(formats)} format(s); disk at most the fp32 students' per format"]))
    stages.append(StageEstimate("report", how="not estimated (a markdown file and figures: "
                                              "seconds, a few MB)"))
    stages.append(StageEstimate("export", disk_fixed=sum(j[4] for j in per_job["distill"])
                                * (1 + len(formats)), how="disk: the distilled students per "
                                                          "format; time not estimated"))
    return Plan(recipe=recipe, records=n, target=target, machine=machine, shapes=shapes,
                stages=stages, cache_copies=draws, d_proj=projection_width(recipe),
                token_options=token_option_bytes(shapes.tokens, shapes.dim,
                                                 d_proj=projection_width(recipe)),
                lines=lines)


class _NoTeacher(nn.Module):
    """Stands for the teacher when distillation reads its (stand-in) cached outputs: the
    job builder only sets which code levels it should give."""


def _decode_seconds(data: Any, recipe: Recipe, k: int = 8) -> float:
    """Seconds per record to read and decode a WFDB record (the data stage's first pass;
    0 when the records are not WFDB files here)."""
    import wfdb


    info = getattr(data, "info", None)
    folder = data_folder(recipe.data, progress=False)
    if info is None or "filename_lr" not in getattr(info, "columns", []):
        return 0.0
    col = "filename_lr" if recipe.data.sampling_rate == 100 else "filename_hr"
    paths = [folder / p for p in list(info[col])[:k]]
    start = time.perf_counter()
    for p in paths:
        wfdb.rdsamp(str(p))
    return (time.perf_counter() - start) / max(len(paths), 1)


# ---------------------------------------------------------------- printing


def format_plan(plan: Plan) -> str:
    r = plan.recipe
    n, m = plan.records, plan.target
    out = [f"plan for {r.name}: {n:,} records in the recipe's data set"
           + (f", extrapolated to {m:,} records (--records)" if m != n else ""),
           f"machine: {plan.machine}; times are this machine's, linear in the records",
           *plan.lines,
           f"teacher outputs per record: {plan.shapes.tokens} tokens x {plan.shapes.dim}, "
           f"pooled {plan.shapes.pooled}, {plan.shapes.classes} logits",
           ""]
    head = (f"{'stage':<14}{'time':>10}{f'time @{m:,}':>15}{'peak memory':>13}"
            f"{'disk':>11}{f'disk @{m:,}':>15}  how")
    out += [head, "-" * len(head)]
    tot = [0.0, 0.0, 0.0, 0.0]
    for s in plan.stages:
        a, b = s.seconds(n), s.seconds(m)
        tot[0] += a or 0
        tot[1] += b or 0
        tot[2] += s.disk(n)
        tot[3] += s.disk(m)
        out.append(f"{s.stage:<14}{format_seconds(a):>10}{format_seconds(b):>15}"
                   f"{format_bytes(s.memory):>13}{format_bytes(s.disk(n)):>11}"
                   f"{format_bytes(s.disk(m)):>15}  {s.how}")
        for note in s.notes:
            out.append(f"{'':<14}  {note}")
    out.append(f"{'total':<14}{format_seconds(tot[0]):>10}{format_seconds(tot[1]):>15}"
               f"{'':>13}{format_bytes(tot[2]):>11}{format_bytes(tot[3]):>15}")
    out += ["", f"teacher cache tokens per storage option ({plan.shapes.tokens} tokens x "
                f"{plan.shapes.dim}"
                + (f", d = {plan.d_proj}" if plan.d_proj else "")
                + (f", x {plan.cache_copies} augmented views" if plan.cache_copies > 1 else "")
                + "):",
            f"  {'option':<12}{'per record':>12}{f'@{n:,}':>12}{f'@{m:,}':>12}  layout"]
    for name, per in plan.token_options.items():
        if per is None:
            out.append(f"  {name:<12}{'-':>12}{'-':>12}{'-':>12}  no token term weighted")
            continue
        c = plan.cache_copies
        out.append(f"  {name:<12}{format_bytes(per):>12}{format_bytes(per * n * c):>12}"
                   f"{format_bytes(per * m * c):>12}  {TOKEN_OPTION_TEXT[name]}")
    out.append("  (the stage table uses fp16, today's storage; the projected option assumes "
               "mhca's keys read the projected tokens too)")
    return "\n".join(out)


# ---------------------------------------------------------------- run's disk check


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(shutil.disk_usage(p).free)


def stage_disk_need(stage: str, ctx: Any) -> tuple[int, Path, str] | None:
    """(bytes a stage of ``run`` is about to write, where, how to reduce it), or None for
    the stages whose output is small (evaluate, quantize, report, export). Sizes only:
    nothing is run or trained."""

    recipe = ctx.recipe
    if stage == "data":
        n = record_count(recipe)
        need = n * sum(data_bytes_per_record(recipe).values())
        return need, cache_root(recipe.data), (
            "point data.cache_dir at a disk with more room, or use a lower "
            "data.sampling_rate or data.image size")
    if stage == "teacher_cache":
        if teacher_runs_live(recipe):
            return None
        jd = ctx.job_data()
        shapes = teacher_shapes(recipe, len(jd.classes),
                                build=lambda: load_frozen_teacher(jd, ctx.run_dir))
        n = len(jd.data.ecg_ids) + (len(jd.transfer.ecg_ids) if jd.transfer is not None else 0)
        draws = augment_draws(recipe) or 1
        need = draws * sum(cache_entry_bytes(shapes, n, recipe.distill.cached_tokens,
                                             projection_width(recipe)).values())
        views = f" (train.augment.views: {draws} stores {draws} copies)" if draws > 1 else ""
        return need, cache_root(recipe.data), (
            f"point data.cache_dir at a disk with more room, cache fewer records{views}, or "
            f"store smaller tokens (distill.cached_tokens: int8, projected or lead_mean; "
            f"`ecg-distill plan` lists their sizes)")
    if stage in ("baseline", "distill", "ablation"):
        jd = ctx.job_data()
        specs = list(recipe.students)
        if stage == "ablation":
            specs = [recipe.students[recipe.ablations.student]] * len(recipe.ablations.runs)
        need = 0
        for spec in specs:
            student = build_student(recipe, spec, jd.classes)
            state, trainable = _count(student)
            need += _checkpoint_bytes(state, trainable, recipe.train.keep_checkpoints)
        return need, ctx.run_dir, ("set output_dir on a disk with more room, or lower "
                                   "train.keep_checkpoints")
    return None


def check_disk(stage: str, ctx: Any) -> None:
    """Refuse (ECGDistillError, one line) a stage whose disk estimate exceeds the free
    space where it writes."""
    found = stage_disk_need(stage, ctx)
    if found is None:
        return
    need, where, hint = found
    free = free_bytes(where)
    if need > free:
        raise ECGDistillError(f"stage {stage}: needs about {format_bytes(need)} of disk in "
                              f"{where} but {format_bytes(free)} is free; {hint}")

