"""The training loop: resume after SIGKILL, checkpoints, determinism, the three commands,
the teacher cache, cross-configuration distillation, 2-process data parallelism."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from distill.engine import checkpoint as ckpt
from distill.cli import main
from distill.core.errors import ECGDistillError
from distill.metrics.classification import macro_auc
from distill.engine.jobs import (baseline_job, build_teacher_cache, load_frozen_teacher, load_job_data,
                          teacher_cache_key)
from distill.recipe import load_recipe
from distill.engine.train import fit

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "_train_worker.py"


def recipe_dict(root: Path, cache: Path, **sections) -> dict:
    """A small distillation recipe: synthetic data, the tiny VLM, one tiny student."""
    d = {
        "name": "t",
        "output_dir": str(root / "runs" / "{name}"),
        "seed": 0,
        "data": {"synthetic": {"records": 240, "seed": 0}, "cache_dir": str(cache)},
        "teacher": {"kind": "vlm", "name_or_path": "tiny", "train_mode": "frozen"},
        "students": [{"family": "xresnet1d", "size": "tiny"}],
        "distill": {"alpha": 0.5, "weights": {"kd": 1.0, "mhca": 1.0, "ot": 1.0, "relation": 1.0},
                    "mhca": {"dim": 32, "heads": 2}, "ot": {"dim": 32, "iters": 20}},
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.003, "checkpoint_every": 4},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return d


def write_recipe(folder: Path, d: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One data cache for the module: the synthetic set is generated and rendered once."""
    return tmp_path_factory.mktemp("train-cache")


def _run_worker(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), str(recipe), str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


def _last_checkpoint(out: Path) -> Path:
    return ckpt.list_checkpoints(out / "checkpoints")[-1]


def _optimizer_state(folder: Path) -> dict:
    return torch.load(folder / "optimizer.bin", weights_only=False)


def _assert_same_tree(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_tree(x, y)
    else:
        assert a == b


@pytest.mark.slow
def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, shared_cache) -> None:
    recipe = write_recipe(tmp_path, recipe_dict(
        tmp_path, shared_cache, train={"grad_accum": 2, "checkpoint_every": 2}))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _run_worker(recipe, straight)
    assert proc.returncode == 0, proc.stderr
    # 192 training records / 16 = 12 batches per epoch, 36 in all, an optimiser step every
    # 2 batches; checkpoints every 2 optimiser steps (4 batches) and at each epoch end.
    # Killed at step 18, mid-epoch 2, after the checkpoint of step 16.
    proc = _run_worker(recipe, killed, "--kill-at", "18")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = [p.name for p in ckpt.list_checkpoints(killed / "checkpoints")]
    assert names == ["step_00000012", "step_00000016"]  # the 2 newest are kept
    assert json.loads((killed / "metrics.json").read_text())["epochs_run"] == 1
    # a half-written checkpoint (as a kill during a save leaves) is never read
    (killed / "checkpoints" / ".tmp-step_00000020").mkdir()

    proc = _run_worker(recipe, killed, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from step_00000016 (epoch 2, 4 batches in)" in proc.stdout
    assert not (killed / "checkpoints" / ".tmp-step_00000020").exists()

    a, b = _last_checkpoint(straight), _last_checkpoint(killed)
    assert a.name == b.name == "step_00000036"
    _assert_same_tree(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"))
    _assert_same_tree(_optimizer_state(a), _optimizer_state(b))
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (straight, killed))
    assert timeless(ma["history"]) == timeless(mb["history"]) and ma["complete"] and mb["complete"]
    assert json.loads((b / "trainer_state.json").read_text())["state"]["updates"] == 18
    assert len(ma["history"]) == 3 and ma["best_val_macro_auc"] == mb["best_val_macro_auc"]
    _assert_same_tree(load_file(straight / "best" / "model.safetensors"),
                      load_file(killed / "best" / "model.safetensors"))


@pytest.mark.parametrize("augment", [{}, {"noise": 0.05, "shift": 0.5, "views": 2}],
                         ids=["plain", "augmented-views"])
def test_a_label_scarce_run_with_transfer_records_resumes_exactly(tmp_path, shared_cache,
                                                                  augment) -> None:
    """The mixed training set (labeled subset, hidden-label records, synthetic transfer
    records) is drawn in the same order after a SIGKILL and a resume; with fixed augmented
    views, each record's view in each epoch, and the teacher's cached outputs on it, too."""
    recipe = write_recipe(tmp_path, recipe_dict(
        tmp_path, shared_cache, train={"epochs": 2, "checkpoint_every": 3, "augment": augment},
        data={"synthetic": {"records": 240, "seed": 0}, "cache_dir": str(shared_cache),
              "label_fraction": 0.5},
        distill={"alpha": 0.5, "mhca": {"dim": 32, "heads": 2}, "ot": {"dim": 32, "iters": 20},
                 "transfer": {"synthetic": 32, "seed": 3}}))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _run_worker(recipe, straight).returncode == 0
    steps = json.loads((straight / "metrics.json").read_text())["steps"]
    kill_at = steps // 2 + 1  # mid-epoch 2, after a checkpoint
    assert _run_worker(recipe, killed, "--kill-at", str(kill_at)).returncode == -signal.SIGKILL
    proc = _run_worker(recipe, killed, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from step_" in proc.stdout
    a, b = _last_checkpoint(straight), _last_checkpoint(killed)
    assert a.name == b.name
    _assert_same_tree(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"))
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (straight, killed))
    assert timeless(ma["history"]) == timeless(mb["history"])


def timeless(history: list[dict]) -> list[dict]:
    """Epoch rows without the wall-clock fields (seconds, records per second)."""
    return [{k: v for k, v in row.items() if "seconds" not in k and "per_s" not in k}
            for row in history]


def _checkpoint(root: Path, step: int, payload: bytes) -> Path:
    tmp = root / f".tmp-{ckpt.checkpoint_name(step)}"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(payload)
    return ckpt.seal(tmp, root / ckpt.checkpoint_name(step), ckpt.TrainerState(step=step))


def test_corrupt_checkpoint_is_reported_and_the_previous_one_used(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    _checkpoint(root, 4, b"a" * 100)
    newest = _checkpoint(root, 8, b"b" * 100)
    (newest / "model.safetensors").write_bytes(b"b" * 50)  # truncated after the fact
    warnings: list[str] = []
    folder, state = ckpt.latest_valid(root, warn=warnings.append)
    assert folder.name == "step_00000004" and state.step == 4
    assert warnings == [f"warning: checkpoint {newest}: model.safetensors does not match its "
                        f"checksum; trying an earlier checkpoint"]
    (root / "step_00000004" / "model.safetensors").unlink()
    assert ckpt.latest_valid(root, warn=warnings.append) is None
    assert "missing file model.safetensors" in warnings[-1]


@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_cache):
    """The loaded data of the small recipe (baseline jobs train in-process on it)."""
    root = tmp_path_factory.mktemp("small")
    recipe = load_recipe(write_recipe(root, recipe_dict(root, shared_cache)))
    return recipe, load_job_data(recipe, progress=False)


def test_same_seed_same_metrics_and_no_silent_overwrite(small, tmp_path, capsys) -> None:
    recipe, jd = small
    recipe.train.epochs = 2
    runs = []
    for name in ("a", "b"):
        result = fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / name,
                     seed=recipe.seed, progress=False)
        runs.append(result.metrics["history"])
    strip = [timeless(h) for h in runs]
    assert strip[0] == strip[1]
    # TensorBoard got the same numbers as the CSV log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "a" / "tensorboard")).Reload()
    logged = [e.value for e in events.Scalars("val_macro_auc")]
    assert logged == pytest.approx([row["val_macro_auc"] for row in runs[0]], abs=1e-6)
    assert len(strip[0]) == 2 and all(np.isfinite(r["val_macro_auc"]) for r in strip[0])
    with pytest.raises(ECGDistillError, match=r"holds checkpoints of an interrupted run; pass "
                                              r"--resume to continue it, or --force baseline"):
        fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / "a",
            seed=recipe.seed, progress=False)
    # resuming a finished run trains nothing more and reports the same
    again = fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / "a",
                seed=recipe.seed, progress=False, resume=True)
    assert again.metrics["history"] == runs[0]
    # a damaged newest checkpoint (end of epoch 2): reported, the previous one (8 batches
    # into epoch 2) used, and the rest of epoch 2 trained again to the same result
    newest = ckpt.list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    (newest / "model.safetensors").write_bytes(b"damaged")
    capsys.readouterr()
    redone = fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / "a",
                 seed=recipe.seed, progress=False, resume=True)
    out = capsys.readouterr().out
    assert f"checkpoint {newest}: model.safetensors does not match its checksum" in out
    assert "resumed from step_00000020 (epoch 2, 8 batches in)" in out
    assert timeless(redone.metrics["history"]) == strip[0]
    # a checkpoint of other settings is refused, with or without --resume
    recipe.train.lr = 0.01
    with pytest.raises(ECGDistillError, match="belongs to a run with other settings; --force "
                                              "baseline deletes it"):
        fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / "a",
            seed=recipe.seed, progress=False, resume=True)
    with pytest.raises(ECGDistillError, match="holds a run with other settings; --force baseline"):
        fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / "a",
            seed=recipe.seed, progress=False)
    recipe.train.lr = 0.003


def test_early_stopping_and_the_saved_state_dict(small, tmp_path, monkeypatch) -> None:
    import dataclasses

    import distill.engine.train as train

    recipe, jd = small
    real = train.evaluate
    scripted = iter([0.6, 0.7, 0.65, 0.69, 0.8, float("nan"), 0.5, 0.4])

    def evaluate(*args, **kwargs):  # the real pass, with a scripted macro AUC
        return dataclasses.replace(real(*args, **kwargs), macro_auc=next(scripted))

    monkeypatch.setattr(train, "evaluate", evaluate)
    recipe.train.epochs, recipe.train.early_stopping = 5, 2
    m = fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / "stop",
            seed=recipe.seed, progress=False).metrics
    # best at epoch 2 (0.7); epochs 3 and 4 do not beat it: stop after epoch 4
    assert m["stopped_early"] and m["epochs_run"] == 4
    assert m["best_epoch"] == 2 and m["best_val_macro_auc"] == 0.7
    next(scripted)  # 0.8 unused
    # a NaN AUC (a validation set without positives) never blocks a later best
    recipe.train.epochs, recipe.train.early_stopping = 3, None
    m = fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / "nan",
            seed=recipe.seed, progress=False).metrics
    assert m["best_epoch"] == 2 and m["best_val_macro_auc"] == 0.5
    recipe.train.early_stopping, recipe.train.lr = None, 0.003
    # save_model writes the state dict it is given (what a sharded run gathers)
    job = baseline_job(jd, recipe.students[0])
    zeros = {k: torch.zeros_like(v) for k, v in job.model.state_dict().items()}
    job.save_model(job.model, tmp_path / "saved", zeros)
    written = load_file(tmp_path / "saved" / "model.safetensors")
    assert written and all(not t.any() for t in written.values())


def test_bf16_trains_on_cpu_and_fp16_is_refused(small, tmp_path) -> None:
    recipe, jd = small
    recipe.train.epochs, recipe.train.mixed_precision, recipe.train.lr = 1, "bf16", 0.003
    result = fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / "bf16",
                 seed=recipe.seed, progress=False)
    assert np.isfinite(result.metrics["history"][0]["train_loss"])
    if not torch.cuda.is_available():
        recipe.train.mixed_precision = "fp16"
        with pytest.raises(ECGDistillError, match="fp16 needs a GPU; use bf16 or no on CPU"):
            fit(baseline_job(jd, recipe.students[0]), recipe.train, tmp_path / "fp16",
                seed=recipe.seed, progress=False)


def test_teacher_cache_matches_the_teacher_and_follows_its_weights(small, monkeypatch) -> None:
    import distill.engine.teacher_cache as tc

    recipe, jd = small
    teacher = load_frozen_teacher(jd, recipe.run_dir)
    cache = build_teacher_cache(jd, teacher, progress=False)
    n = len(jd.data)
    assert cache.logits.shape == (n, 5) and cache.tokens.shape[:2] == (n, 196)
    assert cache.tokens.dtype == np.float16
    with torch.no_grad():
        live = teacher(image=torch.from_numpy(np.asarray(jd.images[:4])))
    np.testing.assert_allclose(cache.logits[:4], live.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(cache.tokens[:4].astype(np.float32), live.tokens.numpy(),
                               rtol=2e-3, atol=2e-3)
    assert torch.equal(cache.token_leads, live.token_leads)

    # a second call reads the entry (the teacher is not run again)
    def no_run(*_a, **_k):
        raise AssertionError("the teacher ran although its outputs were cached")

    monkeypatch.setattr(tc, "_fill", no_run)
    assert build_teacher_cache(jd, teacher, progress=False).folder == cache.folder
    # a changed teacher (one weight) or changed data never reads the old entry
    key = teacher_cache_key(jd, teacher)
    with torch.no_grad():
        teacher.head.bias[0] += 1.0
    assert teacher_cache_key(jd, teacher) != key
    with pytest.raises(AssertionError, match="the teacher ran"):
        build_teacher_cache(jd, teacher, progress=False)
    monkeypatch.undo()
    changed = build_teacher_cache(jd, teacher, progress=False)
    assert changed.folder != cache.folder
    np.testing.assert_allclose(changed.logits[:, 0], cache.logits[:, 0] + 1.0, atol=1e-5)
    other_data = tc.cache_key(teacher, "another-data-fingerprint", {"kind": "vlm"})
    assert other_data != tc.cache_key(teacher, jd.data.fingerprint, {"kind": "vlm"})


@pytest.mark.slow
def test_cross_configuration_and_live_teacher_distillation(tmp_path, shared_cache, capsys) -> None:
    """A 12-lead image teacher at 100 Hz, a lead-I student at 50 Hz; then with augmentation,
    the teacher run live on images drawn from the augmented records, and cached on fixed
    augmented views."""
    d = recipe_dict(tmp_path, shared_cache,
                    students=[{"family": "leadformer", "size": "tiny",
                               "view": {"leads": ["I"], "sampling_rate": 50}}],
                    train={"epochs": 1, "batch_size": 32})
    recipe = write_recipe(tmp_path, d)
    assert main(["distill", str(recipe), "--quiet"]) == 0
    run = tmp_path / "runs" / "t"
    config = json.loads((run / "distill" / "leadformer-tiny" / "best" / "config.json").read_text())
    assert config["leads"] == ["I"] and config["sampling_rate"] == 50
    assert config["input_samples"] == 500
    metrics = json.loads((run / "distill" / "leadformer-tiny" / "metrics.json").read_text())
    assert metrics["complete"] and {"train_ot", "train_mhca", "train_kd"} <= set(metrics["best"])
    stages = json.loads((run / "stages" / "teacher_cache.json").read_text())
    assert stages["summary"]["tokens"][1:] == [196, 64]

    capsys.readouterr()
    assert main(["distill", str(recipe), "train.augment.noise=0.05", "train.augment.shift=0.5",
                 "--quiet", "--force", "distill"]) == 0
    out = capsys.readouterr().out
    assert "runs it live instead of reading a cache" in out
    metrics = json.loads((run / "distill" / "leadformer-tiny" / "metrics.json").read_text())
    assert metrics["complete"] and np.isfinite(metrics["best"]["train_kd"])

    # with fixed views the teacher is cached on each view (augmented, then rendered)
    assert main(["distill", str(recipe), "train.augment.noise=0.05", "train.augment.shift=0.5",
                 "train.augment.views=2", "--quiet", "--force", "distill"]) == 0
    stages = json.loads((run / "stages" / "teacher_cache.json").read_text())
    assert len(stages["summary"]["views"]) == 2 and stages["summary"]["tokens"][1:] == [196, 64]
    metrics = json.loads((run / "distill" / "leadformer-tiny" / "metrics.json").read_text())
    assert metrics["complete"] and np.isfinite(metrics["best"]["train_kd"])


def test_augmented_items_are_reproducible_and_rendered_from_the_augmented_record(small) -> None:
    from distill.data.augment import SignalAugment
    from distill.data.render import render_12lead
    from distill.data.load import render_config

    recipe, jd = small
    aug = SignalAugment(noise=0.05, amplitude=0.2, shift=1.0)
    views = {"teacher": jd.views["teacher"]}
    split = jd.data.split("train", views, transform=aug, render=render_config(recipe.data), seed=3)
    first, again = split[0], split[0]
    assert torch.equal(first["teacher"], again["teacher"])
    split.set_epoch(1)
    other = split[0]
    assert not torch.equal(first["teacher"], other["teacher"])
    k = first["index"]
    rng = np.random.default_rng((3, 1, k))
    x = aug(np.asarray(jd.data.signal(k)), jd.data.sampling_rate, rng)
    assert torch.equal(other["image"], torch.from_numpy(
        render_12lead(x, jd.data.sampling_rate, render_config(recipe.data))))
    plain = jd.data.split("train", views)[0]
    assert not torch.allclose(plain["teacher"], first["teacher"])
    with pytest.raises(Exception, match="extra 'labels' clashes"):
        jd.data.split("train", views, extras={"labels": np.zeros(len(jd.data))})
    with pytest.raises(Exception, match="extra 'x' has 3 rows for 240 records"):
        jd.data.split("train", views, extras={"x": np.zeros(3)})


@pytest.mark.slow
def test_teacher_baseline_and_distillation_improve_validation_auc(tmp_path, shared_cache) -> None:
    d = recipe_dict(tmp_path, shared_cache, data={"synthetic": {"records": 600, "seed": 1}},
                    teacher={"train_mode": "full", "epochs": 3, "lr": 0.002},
                    train={"epochs": 4, "batch_size": 32, "lr": 0.003,
                           "checkpoint_every": None})
    recipe = write_recipe(tmp_path, d)
    for command in ("teacher", "baseline", "distill"):
        assert main([command, str(recipe), "--quiet"]) == 0
    run = tmp_path / "runs" / "t"
    for folder in ("teacher", "baseline/xresnet1d-tiny", "distill/xresnet1d-tiny"):
        metrics = json.loads((run / folder / "metrics.json").read_text())
        aucs = [row["val_macro_auc"] for row in metrics["history"]]
        assert max(aucs[1:]) > aucs[0], (folder, aucs)
        assert metrics["best_val_macro_auc"] == max(aucs)
        header = (run / folder / "log.csv").read_text().splitlines()[0].split(",")
        assert {"epoch", "train_loss", "val_loss", "val_macro_auc", "lr"} <= set(header)
    # the distilled student is a plain student folder: reloads with AutoModel
    from transformers import AutoModel

    import students  # noqa: F401  (registers the student classes)

    model = AutoModel.from_pretrained(run / "distill" / "xresnet1d-tiny" / "best")
    assert type(model).__name__ == "XResNet1dModel"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_evaluate_every_record_once(tmp_path, shared_cache) -> None:
    d = recipe_dict(tmp_path, shared_cache, train={"epochs": 2, "batch_size": 16,
                                                   "checkpoint_every": None})
    recipe_path = write_recipe(tmp_path, d)
    # no GPU in this test even on a GPU machine: the CPU processes talk over gloo
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port",
           str(_free_port()), "-m", "distill.cli", "baseline", str(recipe_path), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "t" / "baseline" / "xresnet1d-tiny"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["complete"]
    assert proc.stdout.count("[baseline] done") == 1  # one process speaks

    recipe = load_recipe(recipe_path)
    jd = load_job_data(recipe, progress=False)
    val = jd.data.splits["val"]
    pred = np.load(out / "best" / "val_predictions.npz")
    # an odd number of validation records over 2 processes: the record Accelerate repeats to
    # even out the last batch was dropped again by gather_for_metrics
    assert len(val) % 2 == 1
    assert sorted(pred["index"].tolist()) == sorted(val.tolist())  # each once

    # a single-process evaluation of the same checkpoint gives the same numbers
    from transformers import AutoModel

    import students  # noqa: F401

    model = AutoModel.from_pretrained(out / "best").eval()
    key = "student:xresnet1d/tiny"
    split = jd.data.split("val", {key: jd.views[key]})
    with torch.no_grad():
        signal = torch.stack([split[i][key] for i in range(len(split))])
        probs = torch.sigmoid(model(signal=signal).logits).numpy()
    order = np.argsort(pred["index"])
    np.testing.assert_allclose(pred["probs"][order], probs[np.argsort(split.indices)],
                               rtol=1e-5, atol=1e-6)
    labels = jd.data.labels[np.sort(val)]
    assert macro_auc(labels, probs[np.argsort(split.indices)]) == pytest.approx(
        metrics["best_val_macro_auc"], abs=1e-6)


@pytest.mark.parametrize("name", ["cpu-2proc", "multi-gpu", "fsdp"])
def test_accelerate_configs_load(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.num_processes == 2 and config.num_machines == 1
    assert config.distributed_type.value == {"fsdp": "FSDP"}.get(name, "MULTI_GPU")


def test_bookkeeping_settings_never_invalidate_training(small) -> None:
    import copy

    from distill.run import pipeline

    recipe, _ = small
    stages = {s.name: s for s in pipeline.STAGES}

    def changed(**train):
        r = copy.deepcopy(recipe)
        for k, v in train.items():
            node, key = (r.teacher, k[8:]) if k.startswith("teacher_") else (r.train, k)
            setattr(node, key, v)
        return {name: pipeline.stage_hash(stage, r) for name, stage in stages.items()}

    base = changed()
    assert changed(keep_checkpoints=5, checkpoint_every=100, num_workers=2) == base
    lr = changed(lr=0.01)
    assert all(lr[n] != base[n] for n in ("teacher", "teacher_cache", "baseline", "distill"))
    # with its own learning rate the teacher no longer follows the students'
    own = changed(teacher_lr=0.002)
    assert changed(teacher_lr=0.002, lr=0.01)["teacher"] == own["teacher"]
    assert own["baseline"] == base["baseline"] and own["teacher"] != base["teacher"]


def test_force_of_a_stage_the_command_does_not_run_is_refused(small) -> None:
    from distill.core.errors import RecipeError
    from distill.run.pipeline import run_pipeline

    recipe, _ = small
    with pytest.raises(RecipeError, match=r"--force distill: this command runs the stages "
                                          r"data, baseline only"):
        run_pipeline(recipe, force=["distill"], stages=("data", "baseline"), progress=False)


@pytest.mark.parametrize("private_helper", [True, False])
def test_each_job_gets_its_own_accelerator_settings(tmp_path, monkeypatch,
                                                    private_helper: bool) -> None:
    """Accelerate keeps AcceleratorState and GradientState as process-wide singletons: a
    second job in the same process must see its own precision and accumulation, through
    Accelerate's reset helper or, in a release without it, by clearing the shared state.
    A release with neither is one clear error."""
    from accelerate.state import AcceleratorState, GradientState

    from distill.recipe import TrainConfig
    from distill.engine.accel import make_accelerator, process_state

    if not private_helper:
        for cls in (AcceleratorState, GradientState):
            monkeypatch.delattr(cls, "_reset_state", raising=False)  # gone in a release
    main_before = process_state().is_main_process
    first = make_accelerator(TrainConfig(mixed_precision="bf16", grad_accum=2), tmp_path, 0,
                             trackers=False)
    assert (first.mixed_precision, first.gradient_accumulation_steps) == ("bf16", 2)
    second = make_accelerator(TrainConfig(mixed_precision="no", grad_accum=1), tmp_path, 0,
                              trackers=False)
    assert (second.mixed_precision, second.gradient_accumulation_steps) == ("no", 1)
    assert process_state().is_main_process == main_before  # the process group is kept
    if not private_helper:
        monkeypatch.setattr(GradientState, "_shared_state", None)
        with pytest.raises(ECGDistillError, match=r"^accelerate \S+: GradientState has no way "
                                                  r"to reset its per-job state"):
            make_accelerator(TrainConfig(), tmp_path, 0, trackers=False)


def test_weights_hash_covers_zero_dim_buffers_and_follows_them() -> None:
    """Batch norm keeps a 0-d ``num_batches_tracked``; the hash reads it (a conv tower's
    teacher once failed here) and changes with it."""
    from distill.engine.teacher_cache import weights_hash

    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.BatchNorm1d(3))
    before = weights_hash(model)
    assert before == weights_hash(model)
    model[1].num_batches_tracked += 1
    assert weights_hash(model) != before
