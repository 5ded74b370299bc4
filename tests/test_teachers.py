"""Teacher adapters: the shared contract over every tiny preset and mode, plus what only
teachers have (LoRA/head parameter sets, 8/4-bit loading, the image patch-to-lead map,
HuBERT-ECG's input layout, the render-size check, trust_remote_code forwarding)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from model_tester import ModelCase, ModelTester, case_id
from torch import nn

import teachers
from distill.data.render import RenderConfig, patch_lead_map, render_batch
from teachers.signal import frame_leads, hubert_ecg_input

NUM_LABELS = 5
FS = 100.0
# Random A and B: with peft's default B = 0 the A matrices get no gradient at step 0.
LORA_TEST = {"r": 4, "alpha": 8, "dropout": 0.0, "init_lora_weights": False}
RELOAD = "import teachers\nmodel = teachers.load(folder)\n"


def _signals(batch: int, seed: int = 0) -> np.ndarray:
    """[B, 12, 10 s at 100 Hz] of smooth per-lead waveforms (mV)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(10 * FS)) / FS
    freq = rng.uniform(0.8, 2.0, size=(batch, 12, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(batch, 12, 1))
    return (0.6 * np.sin(2 * np.pi * freq * t + phase)
            + 0.05 * rng.normal(size=(batch, 12, t.size))).astype(np.float32)


@functools.cache
def _images(batch: int) -> torch.Tensor:
    return torch.from_numpy(render_batch(_signals(batch), FS, RenderConfig(height=224, width=224)))


def _labels(batch: int) -> torch.Tensor:
    return (torch.arange(batch * NUM_LABELS).reshape(batch, NUM_LABELS) % 3 == 0).float()


def image_batch(batch: int) -> dict[str, torch.Tensor]:
    return {"image": _images(batch).clone(), "labels": _labels(batch)}


def signal_batch(batch: int) -> dict[str, torch.Tensor]:
    return {"signal": torch.from_numpy(_signals(batch)), "labels": _labels(batch)}


def vlm(mode: str, tokens: str, preset: str = "tiny"):
    return lambda tmp: teachers.create("vlm", preset, num_labels=NUM_LABELS, train_mode=mode,
                                       tokens=tokens, lora=LORA_TEST)


def save(model: teachers.TeacherAdapter, folder: Path) -> None:
    model.save_pretrained(folder)


def lora_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if "lora_" in n or n.startswith("head.")}


def head_names(model: nn.Module) -> set[str]:
    return {"head.weight", "head.bias"}


def vlm_full_names(model: nn.Module) -> set[str]:
    # everything but the unused vocabulary head and the CLIP post-layernorm (pooler only)
    return {n for n, _ in model.named_parameters()
            if not n.startswith("backbone.lm_head.") and ".post_layernorm." not in n}


def vlm_swin_full_names(model: nn.Module) -> set[str]:
    # everything but the vocabulary head and the Swin tower's final norm (after the
    # hidden states LLaVA reads)
    return {n for n, _ in model.named_parameters()
            if not n.startswith("backbone.lm_head.") and ".vision_tower.layernorm." not in n}


CASES = [
    ModelCase("vlm-full-vision", vlm("full", "vision"), image_batch, NUM_LABELS, save, RELOAD,
              trainable=vlm_full_names),
    ModelCase("vlm-full-language", vlm("full", "language"), image_batch, NUM_LABELS,
              trainable=vlm_full_names),
    ModelCase("vlm-lora-vision", vlm("lora", "vision"), image_batch, NUM_LABELS, save, RELOAD,
              trainable=lora_names),
    ModelCase("vlm-lora-language", vlm("lora", "language"), image_batch, NUM_LABELS,
              trainable=lora_names),
    ModelCase("vlm-head-vision", vlm("head", "vision"), image_batch, NUM_LABELS, save, RELOAD,
              trainable=head_names),
    ModelCase("vlm-head-language", vlm("head", "language"), image_batch, NUM_LABELS,
              trainable=head_names),
    # a Swin tower: convolutional stem, local attention, no CLS token, 16-px token stride
    ModelCase("vlm-swin-full-vision", vlm("full", "vision", "tiny-swin"), image_batch,
              NUM_LABELS, save, RELOAD, trainable=vlm_swin_full_names),
    ModelCase("vlm-swin-lora-vision", vlm("lora", "vision", "tiny-swin"), image_batch,
              NUM_LABELS, trainable=lora_names),
    ModelCase("signal-hubert-full",
              lambda tmp: teachers.create("signal", num_labels=NUM_LABELS, sampling_rate=FS),
              signal_batch, NUM_LABELS, save, RELOAD),
    ModelCase("signal-hubert-lora",
              lambda tmp: teachers.create("signal", num_labels=NUM_LABELS, sampling_rate=FS,
                                          train_mode="lora", lora=LORA_TEST),
              signal_batch, NUM_LABELS, save, RELOAD, trainable=lora_names),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
class TestTeachers(ModelTester):
    pass


# ----------------------------------------------------------------------------- modes


def test_lora_trains_exactly_the_adapters_and_head() -> None:
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="lora", lora=LORA_TEST)
    r = LORA_TEST["r"]
    text = model.hf_model.model.language_model
    wrapped = {n: m for n, m in text.named_modules() if hasattr(m, "lora_A")}
    # 2 layers x (q, k, v, o, gate, up, down); nothing in the vision tower or projector
    assert len(wrapped) == 14
    assert not any("lora_" in n for n, _ in model.hf_model.model.vision_tower.named_parameters())
    expected = sum(r * (m.in_features + m.out_features) for m in wrapped.values())
    head = 64 * NUM_LABELS + NUM_LABELS
    assert expected == 8192  # r=4: 2 x (4*128 + 4*96 + 4*96 + 4*128 + 3 * 4*192)
    assert model.trainable_parameter_count() == expected + head
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_names(model)


def test_head_and_frozen_modes() -> None:
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="head")
    assert model.trainable_parameter_count() == 64 * NUM_LABELS + NUM_LABELS
    model.apply_train_mode("frozen")
    assert model.trainable_parameter_count() == 0
    with pytest.raises(ValueError, match="unknown train_mode 'half'"):
        model.apply_train_mode("half")


def test_lora_folder_holds_only_adapters(tmp_path: Path) -> None:
    model = teachers.create("signal", num_labels=NUM_LABELS, train_mode="lora", lora=LORA_TEST)
    model.save_pretrained(tmp_path)
    files = {p.name for p in (tmp_path / "backbone").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert (tmp_path / "head.safetensors").is_file() and (tmp_path / "teacher.json").is_file()


# ----------------------------------------------------------------------------- 8/4-bit

# Relative Frobenius error of logits / pooled against the fp32 model from the same folder.
# Measured on the random tiny presets (hidden 64, where quantization hurts most):
# vlm 8bit 0.017 / 0.013, 4bit 0.17 / 0.16; signal 8bit 0.011 / 0.006, 4bit 0.05 / 0.10.
QUANT_TOLERANCE = {"8bit": 0.05, "4bit": 0.35}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("load_in", ["8bit", "4bit"])
def test_quantized_vlm_replaces_language_linears_and_stays_close(load_in: str) -> None:
    import bitsandbytes as bnb

    layer = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}[load_in]
    ref = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="frozen").eval()
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="head",
                            load_in=load_in).eval()
    model.head.load_state_dict(ref.head.state_dict())
    text = model.hf_model.model.language_model
    assert sum(isinstance(m, layer) for m in text.modules()) == 14
    assert not any(type(m) is nn.Linear for m in text.modules())
    vision = model.hf_model.model.vision_tower  # kept in full precision
    assert not any(isinstance(m, layer) for m in vision.modules())
    assert model.head.weight.dtype == torch.float32
    batch = image_batch(2)
    with torch.no_grad():
        got, want = model(image=batch["image"]), ref(image=batch["image"])
    torch.testing.assert_close(got.tokens, want.tokens)  # vision tokens: fp tower, fp projector
    assert _rel(got.logits, want.logits) < QUANT_TOLERANCE[load_in]
    assert _rel(got.pooled, want.pooled) < QUANT_TOLERANCE[load_in]
    with pytest.raises(ValueError, match="full-precision backbone"):
        model.apply_train_mode("full")


@pytest.mark.parametrize("load_in", ["8bit", "4bit"])
def test_quantized_signal_teacher_stays_close(load_in: str) -> None:
    import bitsandbytes as bnb

    layer = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}[load_in]
    ref = teachers.create("signal", num_labels=NUM_LABELS, train_mode="frozen").eval()
    model = teachers.create("signal", num_labels=NUM_LABELS, train_mode="frozen",
                            load_in=load_in).eval()
    model.head.load_state_dict(ref.head.state_dict())
    # feature projection + 2 layers x (q, k, v, out, intermediate, output)
    assert sum(isinstance(m, layer) for m in model.backbone.modules()) == 13
    signal = signal_batch(2)["signal"]
    with torch.no_grad():
        got, want = model(signal=signal), ref(signal=signal)
    assert _rel(got.logits, want.logits) < QUANT_TOLERANCE[load_in]
    assert _rel(got.pooled, want.pooled) < QUANT_TOLERANCE[load_in]


# ----------------------------------------------------------------------------- image geometry


def test_vlm_token_leads_are_the_render_patch_map() -> None:
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="frozen")
    expected = torch.from_numpy(patch_lead_map(RenderConfig(height=224, width=224), 16))
    assert torch.equal(model.token_leads, expected)
    assert len(model.image_positions) == 196  # 14 x 14 patches, CLS dropped ("default")


def test_swin_tower_tokens_follow_its_grid_not_its_patch_size() -> None:
    """The Swin tower's 4-px patches merge twice: 196 tokens at a 16-px stride, no CLS
    token, so the patch-to-lead map is the renderer's at 16 px with no leading -1."""
    model = teachers.create("vlm", "tiny-swin", num_labels=NUM_LABELS, train_mode="frozen")
    assert model.hf_model.config.vision_config.patch_size == 4 and model.patch_size == 16
    expected = torch.from_numpy(patch_lead_map(RenderConfig(height=224, width=224), 16))
    assert torch.equal(model.token_leads, expected)
    with torch.no_grad():
        out = model(image=_images(2))
    assert out.tokens.shape == (2, 196, 64)


@pytest.mark.parametrize("n,size,want", [(196, 224, (14, False)), (197, 224, (14, True)),
                                         (576, 336, (24, False)), (577, 336, (24, True)),
                                         (1, 224, (1, False)), (195, 224, (None, False)),
                                         (225, 224, (None, False))])
def test_token_grid(n: int, size: int, want: tuple) -> None:
    from teachers.vlm import token_grid

    assert token_grid(n, size) == want  # 225 = 15 x 15 does not divide 224 px


def test_changing_one_lead_changes_only_its_patch_embeddings() -> None:
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="frozen")
    signals = _signals(1)
    lead = 7  # V2
    changed = signals.copy()
    changed[0, lead] = -changed[0, lead] + 0.8
    config = RenderConfig(height=224, width=224)
    images = torch.from_numpy(np.concatenate([render_batch(signals, FS, config),
                                              render_batch(changed, FS, config)]))
    embed = model.hf_model.model.vision_tower.embeddings.patch_embedding  # conv, before attention
    with torch.no_grad():
        patches = embed(model.pixel_values(images)).flatten(2).transpose(1, 2)  # (2, 196, D)
    moved = (patches[0] - patches[1]).abs().amax(dim=-1) > 1e-6  # (196,)
    leads = model.token_leads
    assert moved.any() and (leads[moved] == lead).any()
    assert set(leads[moved].tolist()) <= {lead, -1}


def test_vision_tokens_are_the_projected_patch_features() -> None:
    """Whatever form the installed transformers returns them in, the vision tokens are the
    projector applied to the chosen vision layer without its CLS token (computed here from
    the tower's hidden states, a path no release has changed)."""
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="frozen", tokens="vision")
    image = _images(2)
    inner = model.hf_model.model
    with torch.no_grad():
        out = model(image=image)
        hidden = inner.vision_tower(model.pixel_values(image),
                                    output_hidden_states=True).hidden_states
        want = inner.multi_modal_projector(hidden[model.hf_model.config.vision_feature_layer][:, 1:])
    assert out.tokens.shape == (2, 196, 64)
    torch.testing.assert_close(out.tokens, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["tensor", "flat", "list", "tuple", "batched-list",
                                  "image_outputs"])
def test_visual_tokens_reads_every_output_form(form: str) -> None:
    from types import SimpleNamespace

    from teachers.vlm import visual_tokens

    want = torch.randn(3, 4, 5)
    given = {"tensor": want, "flat": want.reshape(12, 5), "list": list(want),
             "tuple": tuple(want), "batched-list": [t[None] for t in want],
             "image_outputs": None}[form]
    if form == "image_outputs":  # 5.2x: a deprecated alias beside it must not be read
        out = SimpleNamespace(image_outputs=SimpleNamespace(pooler_output=list(want)),
                              image_hidden_states=[torch.zeros(3, 5, 6)] * 2)
    else:
        out = SimpleNamespace(image_hidden_states=given)
    torch.testing.assert_close(visual_tokens(out, 3, 4, 5), want)


def test_visual_tokens_of_the_wrong_size_are_one_clear_error() -> None:
    from types import SimpleNamespace

    from teachers.vlm import visual_tokens

    with pytest.raises(ValueError, match=r"^VLM: expected 2 x 4 visual tokens of width 5 "
                                         r"in the model's output, found \(2, 5, 5\) "
                                         r"\(transformers \S+\); use tokens='language'"):
        visual_tokens(SimpleNamespace(image_hidden_states=torch.zeros(2, 5, 5)), 2, 4, 5)
    with pytest.raises(ValueError, match=r"found None"):
        visual_tokens(SimpleNamespace(), 2, 4, 5)


def test_pixel_values_match_the_processor() -> None:
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="frozen")
    image = _images(1)
    ref = model.processor(text="<image>", images=image[0].permute(1, 2, 0).numpy(),
                          return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(model.pixel_values(image), ref, atol=1e-5, rtol=1e-5)


def test_wrong_render_size_is_refused_with_the_size_to_use() -> None:
    with pytest.raises(ValueError, match=r"render at height=224, width=224"):
        teachers.create("vlm", num_labels=NUM_LABELS, image_size=256)
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="frozen")
    image = torch.from_numpy(render_batch(_signals(1), FS, RenderConfig(height=256, width=256)))
    with pytest.raises(ValueError, match=r"got 256x256 images.*takes 224x224"):
        model(image=image)


# ----------------------------------------------------------------------------- signal input


def test_hubert_input_concatenates_leads_in_time() -> None:
    signal = torch.from_numpy(_signals(2))
    flat = hubert_ecg_input(signal, FS, bandpass=None, scale=False)  # (2, 6000)
    assert flat.shape == (2, 6000)
    for k in range(12):
        torch.testing.assert_close(flat[:, k * 500:(k + 1) * 500], signal[:, k, :500])
    # the same record at 500 Hz gives the 100 Hz input (FFT resampling of a band-limited wave)
    t = np.arange(5000) / 500.0
    wave = np.sin(2 * np.pi * 1.3 * t)[None, None].repeat(12, axis=1)
    fast = hubert_ecg_input(torch.from_numpy(wave).float(), 500.0, bandpass=None, scale=False)
    slow = torch.from_numpy(wave[..., ::5].reshape(1, 12, -1)[..., :500].reshape(1, -1)).float()
    torch.testing.assert_close(fast, slow, atol=1e-3, rtol=0)
    scaled = hubert_ecg_input(signal, FS)
    assert scaled.amin() >= -1 - 1e-5 and scaled.amax() <= 1 + 1e-5
    with pytest.raises(ValueError, match="at least 5 s"):
        hubert_ecg_input(signal[..., :300], FS)


def test_signal_frame_leads_follow_the_conv_receptive_fields() -> None:
    # tiny preset: kernels (10, 3, 3), strides (5, 2, 2): a frame every 20 samples, 40 wide
    leads = frame_leads(6000, 500, [10, 3, 3], [5, 2, 2])
    assert leads.shape == (299,) and leads[0] == 0 and leads[-1] == 11
    assert (leads == -1).sum() == 11  # one frame straddles each of the 11 lead boundaries
    model = teachers.create("signal", num_labels=NUM_LABELS, train_mode="frozen")
    assert torch.equal(model.token_leads, leads)
    # changing one lead changes only the conv features of its own (or straddling) frames
    signal = torch.from_numpy(_signals(1))
    changed = signal.clone()
    changed[0, 4] = torch.flip(changed[0, 4], dims=[0])
    with torch.no_grad():
        feats = [model.hf_model.feature_extractor(model.encoder_input(s)).transpose(1, 2)
                 for s in (signal, changed)]  # (1, F, C)
    moved = (feats[0] - feats[1]).abs().amax(dim=-1)[0] > 1e-6
    assert moved.any() and set(leads[moved].tolist()) <= {4, -1}


# ----------------------------------------------------------------------------- factory


def test_unknown_kind_and_misplaced_options() -> None:
    known = r"\(known: foundation, signal, vlm\)$"
    with pytest.raises(ValueError, match=r"^unknown teacher kind 'x' " + known):
        teachers.create("x", num_labels=2)
    assert teachers.KINDS == ("foundation", "signal", "vlm")
    with pytest.raises(ValueError, match="only apply to the vlm teacher"):
        teachers.create("signal", num_labels=2, tokens="vision")
    with pytest.raises(ValueError, match="unknown VLM token source"):
        teachers.create("vlm", num_labels=2, tokens="audio")


def _spy(monkeypatch: pytest.MonkeyPatch, cls: type, calls: list) -> None:
    original = cls.from_pretrained.__func__

    def from_pretrained(klass, *args, **kwargs):
        calls.append((cls.__name__, kwargs.get("trust_remote_code")))
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_off_unless_asked_and_forwarded(
        monkeypatch: pytest.MonkeyPatch, trust: bool) -> None:
    import transformers

    calls: list = []
    for cls in (transformers.AutoProcessor, transformers.AutoModelForImageTextToText,
                transformers.AutoModel):
        _spy(monkeypatch, cls, calls)
    kwargs = {"trust_remote_code": True} if trust else {}
    teachers.create("vlm", num_labels=2, train_mode="frozen", **kwargs)
    teachers.create("signal", num_labels=2, train_mode="frozen", **kwargs)
    names = [name for name, _ in calls]
    assert {"AutoProcessor", "AutoModelForImageTextToText", "AutoModel"} <= set(names)
    assert all(flag is trust for _, flag in calls), calls


def test_head_mode_saves_only_the_head_and_reloads(tmp_path: Path) -> None:
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="head",
                            tokens="language", id2label={i: f"c{i}" for i in range(NUM_LABELS)})
    with torch.no_grad():
        model.head.weight.normal_()
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "backbone").exists()  # the unchanged backbone is named, not copied
    again = teachers.load(tmp_path)
    assert again.train_mode == "head" and again.id2label == model.id2label
    assert again.tokens_from == "language" and again.trust_remote_code is False
    batch = image_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(image=batch["image"]).logits,
                                   model.eval()(image=batch["image"]).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_signal_teacher_preprocessing_stays_on_the_input_device() -> None:
    from teachers.signal import hubert_ecg_input

    x = torch.randn(2, 12, 1000, device="cuda")
    out = hubert_ecg_input(x, 100.0)
    assert out.device == x.device and torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu(), hubert_ecg_input(x.cpu(), 100.0), rtol=1e-4, atol=1e-4)


def test_an_incomplete_tiny_preset_folder_is_rebuilt(tmp_path, monkeypatch) -> None:
    """A preset folder without weights (as a non-main process of a distributed run once
    left behind) is set aside and built again, not trusted."""
    import teachers.tiny as tiny

    monkeypatch.setenv("ECG_DISTILL_CACHE", str(tmp_path))
    broken = tmp_path / "teachers" / tiny.TINY_SIGNAL_NAME
    broken.mkdir(parents=True)
    (broken / "preprocessor_config.json").write_text("{}")
    folder = tiny.tiny_folder("signal")
    assert folder == broken and (folder / "config.json").is_file()
    assert list(folder.glob("*.safetensors"))


def test_conv_tower_plugs_into_llava_and_reloads(tmp_path: Path) -> None:
    """The registered convolutional tower: a 14 x 14 token grid at 224 px (no CLS token),
    every stage reached by gradients, and a LLaVA over it saved and reloaded through
    from_pretrained with the same outputs."""
    from teachers.conv_tower import EcgConvTowerConfig
    from teachers.tiny import _write_tiny_llava

    config = EcgConvTowerConfig(widths=[8, 16, 16, 32], hidden_size=32, intermediate_size=64)
    assert config.grid == 14
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*4"):
        EcgConvTowerConfig(image_size=100)
    _write_tiny_llava(tmp_path / "llava", config, image_size=224, token_stride=16,
                      strategy="full", extra_tokens=0)
    model = teachers.create("vlm", str(tmp_path / "llava"), num_labels=NUM_LABELS)
    assert model.patch_size == 16 and len(model.token_leads) == 196
    assert torch.equal(model.token_leads, torch.from_numpy(
        patch_lead_map(RenderConfig(height=224, width=224), 16)))
    out = model(**image_batch(2))
    assert out.tokens.shape == (2, 196, 64)
    out.loss.backward()
    tower = model.hf_model.base_model.vision_tower
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
    model.eval().save_pretrained(tmp_path / "saved")
    again = teachers.load(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(image=_images(2)).logits, model(image=_images(2)).logits)
    with pytest.raises(ValueError, match=r"expects pixel_values \[B, 3, 224, 224\]"):
        tower(torch.zeros(1, 3, 112, 112))
    # no transformer layers: the convolutions' tokens, every tower parameter still used
    config.num_hidden_layers = 0
    _write_tiny_llava(tmp_path / "conv-only", config, image_size=224, token_stride=16,
                      strategy="full", extra_tokens=0)
    conv_only = teachers.create("vlm", str(tmp_path / "conv-only"), num_labels=NUM_LABELS)
    assert not any("vision_tower" in n for n in conv_only.unused_parameter_names())


def test_vlm_pool_reads_the_image_positions_and_survives_a_reload(tmp_path: Path) -> None:
    """``pool="image-mean"``: the head reads the mean of the language model's last hidden
    states at the image positions (not the last prompt position); the setting is saved."""
    torch.manual_seed(0)
    model = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="frozen",
                            pool="image-mean").eval()
    last = teachers.create("vlm", num_labels=NUM_LABELS, train_mode="frozen").eval()
    images = image_batch(2)["image"]
    with torch.no_grad():
        out = model(image=images)
        ids = model.input_ids.unsqueeze(0).expand(2, -1)
        hidden = model.hf_model.base_model(input_ids=ids, pixel_values=model.pixel_values(images),
                                           return_dict=True).last_hidden_state
        torch.testing.assert_close(out.pooled, hidden[:, model.image_positions].mean(1))
        torch.testing.assert_close(last(image=images).pooled, hidden[:, -1])
        torch.testing.assert_close(out.logits, model.head(out.pooled))
    model.save_pretrained(tmp_path / "saved")
    again = teachers.load(tmp_path / "saved").eval()
    assert again.pool == "image-mean"
    with torch.no_grad():
        torch.testing.assert_close(again(image=images).logits, out.logits)
    with pytest.raises(ValueError, match="unknown VLM pool 'max'"):
        teachers.create("vlm", num_labels=NUM_LABELS, pool="max")
