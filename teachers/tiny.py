"""The ``tiny`` teacher presets: small random-initialised models of the real classes.

Each builder writes a folder that the same ``from_pretrained`` path as a real hub
checkpoint loads (``AutoModelForImageTextToText`` + ``AutoProcessor`` for the VLM,
``AutoModel`` for the signal encoder), so tests and the quickstart run offline on CPU
through the code a real teacher takes. Weights come from a fixed seed, so two builds give
the same model.

``name_or_path="tiny"`` resolves to a folder built once under
``default_cache_dir()/teachers/`` (:func:`tiny_folder`); the build goes to a temporary
folder that is renamed into place, so a killed build never leaves a half-made preset.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distill.core.io import atomic_dir
from distill.data.cache import default_cache_dir
from distill.core.vlm import (  # noqa: F401  (re-exported: the presets' shared pieces)
    ECG_WORDS,
    IMAGE_TOKEN,
    PRINTOUT_MEAN,
    PRINTOUT_STD,
    build_tiny_tokenizer,
)
from teachers.conv_tower import EcgConvTowerConfig

# Bumped whenever a preset's configuration changes, so an old cached build is not reused.
TINY_VLM_NAME = "tiny-vlm-v2"  # v2: vision initializer_factor 4
TINY_VLM_SWIN_NAME = "tiny-vlm-swin-v1"
VLM_SMALL_INIT_NAME = "ecg-vlm-small-init-v3"  # v3: convolutional tower (v1, v2: Swin)
TINY_SIGNAL_NAME = "tiny-hubert-v1"

# CLIP's default initialisation (factor 1) leaves a 64-wide, 2-layer tower almost blind to
# what differs between ECG printouts (mostly white paper): its visual tokens vary across
# images by ~0.4% and training collapses to the label priors. A factor of 4 scales the
# patch and position embeddings so that the tower starts out seeing the traces; then the
# tiny teacher learns the synthetic task (measured: it fits 64 images to a loss of 0.03
# in 100 steps, where factor 1 stays at the priors, 0.51).
VISION_INIT_FACTOR = 4.0
TEXT_INIT_RANGE = 0.02


def _write_tiny_llava(folder: Path, vision, *, image_size: int, token_stride: int,
                      strategy: str, extra_tokens: int, text_width: int = 64,
                      text_layers: int = 2, image_mean: tuple[float, ...] | None = None,
                      image_std: tuple[float, ...] | None = None) -> Path:
    """A LLaVA over ``vision`` and a small Llama, with its processor, written to ``folder``.

    Args:
        token_stride: pixels per visual token along each side (the processor's patch size).
        strategy: LLaVA's ``vision_feature_select_strategy`` ("default" drops a CLS token).
        extra_tokens: tokens the tower adds to the grid (1 for a CLS token, else 0).
        text_width, text_layers: the Llama's hidden size (MLP 2x, 4 heads of which 2 for
            keys/values) and depth.
        image_mean, image_std: the processor's normalisation (None: CLIP's).
    """
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tiny_tokenizer()
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_width,
                       intermediate_size=2 * text_width, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False, initializer_range=TEXT_INIT_RANGE)
    grid = image_size // token_stride
    n_image_tokens = grid * grid + extra_tokens - (1 if strategy == "default" else 0)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=n_image_tokens, vision_feature_layer=-1,
                         vision_feature_select_strategy=strategy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config)
    norm = {} if image_mean is None else {"image_mean": list(image_mean),
                                          "image_std": list(image_std)}
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        **norm)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=token_stride, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=extra_tokens, image_token=IMAGE_TOKEN)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_vlm(folder: str | os.PathLike) -> Path:
    """Write a tiny random LLaVA (CLIP 224/16 vision tower + Llama text model) with its processor.

    Vision: CLIP, image 224, patch 16 (196 patches), hidden 64, 2 layers. Text: Llama,
    hidden 64, 2 layers. The projector maps 64 -> 64. ``vision_feature_layer=-1`` so every
    vision layer feeds the visual tokens ("default" strategy: the CLS token is dropped).

    Args:
        folder: where to write (created).

    Returns:
        The folder, loadable by ``AutoModelForImageTextToText.from_pretrained`` and
        ``AutoProcessor.from_pretrained``.
    """
    from transformers import CLIPVisionConfig

    image_size, patch_size = 224, 16
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=64,
                              intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=64,
                              initializer_factor=VISION_INIT_FACTOR)
    return _write_tiny_llava(Path(folder), vision, image_size=image_size,
                             token_stride=patch_size, strategy="default", extra_tokens=1)


def build_tiny_vlm_swin(folder: str | os.PathLike) -> Path:
    """Write a tiny random LLaVA whose vision tower is a 3-stage Swin (no CLS token).

    Vision: Swin, image 224, 4-px patches, widths 32/64/128, depths 2/2/2, window 7: its
    last stage is a 14 x 14 grid, so 196 visual tokens at a 16-px stride, each reading
    its own region of the printout through a convolutional stem and local attention.
    Every token of the grid is kept ("full" strategy). Text: the same tiny Llama.

    Args:
        folder: where to write (created).

    Returns:
        The folder, loadable like :func:`build_tiny_vlm`'s.
    """
    from transformers import SwinConfig

    image_size = 224
    vision = SwinConfig(image_size=image_size, patch_size=4, embed_dim=32, depths=[2, 2, 2],
                        num_heads=[2, 4, 8], window_size=7, mlp_ratio=2.0,
                        drop_path_rate=0.0)
    stride = 4 * 2 ** (len(vision.depths) - 1)
    return _write_tiny_llava(Path(folder), vision, image_size=image_size, token_stride=stride,
                             strategy="full", extra_tokens=0)


def build_vlm_small_init(folder: str | os.PathLike) -> Path:
    """Write the untrained architecture of the embedded ``ecg-vlm-small`` teacher.

    Vision: the convolutional tower :class:`teachers.conv_tower.EcgConvTowerModel` over
    224 x 224 printouts: four stages of a 3x3 stride-2 and a 3x3 convolution with batch
    norm (32, 64, 128, 192 channels), a 1x1 projection to 256, learned positions and 2
    transformer layers over the 14 x 14 grid: 196 visual tokens at a 16-px stride, no CLS
    token ("full" strategy). Text: a Llama of width 256, 2 layers. The processor
    normalises with the printouts' own statistics (:data:`PRINTOUT_MEAN`). 3.35M
    parameters, trained by ``recipes/teacher-zoo/ecg-vlm-small.yaml``.

    Why convolutions: a 2-stage Swin of the same size (preset v1/v2) learned slowly from
    scratch (0.63-0.64 validation macro AUC after 250-750 steps of 32 images, measured
    with that recipe); with ``benchmarks/teacher_learning.py`` on 1,600 records (300
    steps of 64) this tower reached 0.69 through the LLaVA readout, the Swin 0.59-0.60.

    Args:
        folder: where to write (created).

    Returns:
        The folder, loadable like :func:`build_tiny_vlm`'s.
    """

    image_size = 224
    vision = EcgConvTowerConfig(image_size=image_size)
    return _write_tiny_llava(Path(folder), vision, image_size=image_size,
                             token_stride=image_size // vision.grid, strategy="full",
                             extra_tokens=0, text_width=256, text_layers=2,
                             image_mean=PRINTOUT_MEAN, image_std=PRINTOUT_STD)


def build_tiny_hubert(folder: str | os.PathLike) -> Path:
    """Write a tiny random ``HubertModel`` (3 conv layers, stride 20, 2 transformer layers).

    The conv feature extractor has kernels (10, 3, 3) and strides (5, 2, 2): one frame
    every 20 input samples, receptive field 40 samples, so a 5 s x 12-lead record at
    100 Hz (6000 samples) gives 299 frames, 25 per lead. The conv layers use per-frame
    layer norm ("layer"; "group" normalises each channel over the whole sequence, so
    every frame would feel every lead). Layer drop and SpecAugment masking are off, so
    every parameter takes part in every training step.

    Args:
        folder: where to write (created).

    Returns:
        The folder, loadable by ``AutoModel.from_pretrained``.
    """
    from transformers import HubertConfig, HubertModel

    folder = Path(folder)
    config = HubertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, conv_dim=(64, 64, 64), conv_stride=(5, 2, 2),
                          conv_kernel=(10, 3, 3), feat_extract_norm="layer",
                          num_conv_pos_embeddings=16,
                          num_conv_pos_embedding_groups=4, layerdrop=0.0,
                          mask_time_prob=0.0, mask_feature_prob=0.0, apply_spec_augment=False,
                          vocab_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HubertModel(config)
    model.save_pretrained(folder)
    return folder


TINY_BUILDERS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "vlm": (TINY_VLM_NAME, build_tiny_vlm),
    "vlm-swin": (TINY_VLM_SWIN_NAME, build_tiny_vlm_swin),
    "vlm-small-init": (VLM_SMALL_INIT_NAME, build_vlm_small_init),
    "signal": (TINY_SIGNAL_NAME, build_tiny_hubert),
}
# The names a recipe's ``name_or_path`` may give for each adapter kind's tiny presets.
TINY_NAMES: dict[str, dict[str, str]] = {
    "vlm": {"tiny": "vlm", "tiny-swin": "vlm-swin", "ecg-vlm-small-init": "vlm-small-init"},
    "signal": {"tiny": "signal"},
}


def resolve_tiny(kind: str, name_or_path: str | os.PathLike) -> str | os.PathLike:
    """The built folder of a tiny preset name of an adapter kind; anything else as given."""
    preset = TINY_NAMES.get(kind, {}).get(str(name_or_path))
    return name_or_path if preset is None else tiny_folder(preset)


def _complete(folder: Path) -> bool:
    """A preset folder holding its config and weights."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def tiny_folder(kind: str) -> Path:
    """The cached folder of a kind's tiny preset, built on first use (atomically).

    Args:
        kind: a key of :data:`TINY_BUILDERS` ("vlm", "vlm-swin", "signal").

    Returns:
        ``default_cache_dir()/teachers/<preset name>``.
    """
    name, build = TINY_BUILDERS[kind]
    root = default_cache_dir() / "teachers"
    target = root / name
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    if target.exists():  # an incomplete folder (a build cut short): set it aside
        shutil.rmtree(target.rename(root / f".{name}-broken-{os.getpid()}"), ignore_errors=True)
    with atomic_dir(target, replace=False) as tmp:  # another process's finished build is kept
        build(tmp)
        if not _complete(tmp):
            # transformers writes weights from the main process only once torch.distributed
            # is set up; build presets on the main process (main_process_first)
            raise RuntimeError(f"building the tiny {kind} preset wrote no weights to {tmp}; "
                               f"under several processes, build it on the main one first")
    deadline = time.monotonic() + 60
    while not _complete(target) and time.monotonic() < deadline:
        time.sleep(0.1)  # another process's rename may still be completing
    if not _complete(target):
        raise RuntimeError(f"building the tiny {kind} preset: {target} is incomplete")
    return target
