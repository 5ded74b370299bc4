"""The teacher cache's weights identity (distill.core.weights): cheap, and exact.

A backbone loaded from files is identified by the files (hub blob names, or local file
hashes remembered by size and modification time) while its tensors are unchanged; any
change to any tensor, in memory or in a file, changes the identity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel, GPT2Config, GPT2Model

import distill.core.weights as W
from distill.core.weights import full_weights_hash, weights_hash, weights_stamp
from teachers.base import load_backbone, weights_folder


class Adapter(nn.Module):
    """A teacher-like wrapper: a loaded backbone and a fresh head."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        torch.manual_seed(0)
        self.head = nn.Linear(8, 3)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)
              ).save_pretrained(tmp_path / "backbone")
    return tmp_path / "backbone"


def _load(folder: Path) -> Adapter:
    return Adapter(load_backbone(AutoModel, folder, load_in="none", trust_remote_code=False))


def test_same_files_same_identity_and_files_are_read_once(folder: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    memo = tmp_path / "memo.json"
    a = weights_hash(_load(folder), memo)
    calls = []
    real = W.sha256_file
    monkeypatch.setattr(W, "sha256_file", lambda p: calls.append(p) or real(p))
    b = weights_hash(_load(folder), memo)  # a fresh load: the remembered file hashes
    assert a == b and calls == []
    model = _load(folder)
    assert weights_hash(model, None) == a  # without the memo: the files are read, same value
    assert len(calls) == 2  # config.json and model.safetensors, each once
    calls.clear()
    weights_hash(model, None)  # asked again: kept on the model
    assert calls == []


def test_any_tensor_change_changes_the_identity(folder: Path, tmp_path: Path) -> None:
    memo = tmp_path / "memo.json"
    base = weights_hash(_load(folder), memo)
    changed = _load(folder)
    with torch.no_grad():  # one element of the backbone, in place
        changed.backbone.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert weights_hash(changed, memo) not in (base, None)
    # equal to hashing every tensor: the files no longer stand for this backbone
    other = _load(folder)
    with torch.no_grad():
        other.backbone.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert weights_hash(changed, memo) == weights_hash(other, memo)
    # the head is not in the files: its bytes are hashed
    head = _load(folder)
    with torch.no_grad():
        head.head.bias[0] = 5.0
    assert weights_hash(head, memo) != base
    # a replaced tensor (new storage) counts as a change as well
    swapped = _load(folder)
    swapped.backbone.wte.weight = nn.Parameter(swapped.backbone.wte.weight.detach().clone())
    assert weights_stamp(swapped) != weights_stamp(_load(folder))
    # load_state_dict writes in place: the stamp moves with it
    loaded = _load(folder)
    stamp = weights_stamp(loaded)
    loaded.load_state_dict(changed.state_dict())
    assert weights_stamp(loaded) != stamp
    assert weights_hash(loaded, memo) == weights_hash(changed, memo)


def test_a_changed_file_changes_the_identity(folder: Path, tmp_path: Path) -> None:
    memo = tmp_path / "memo.json"
    base = weights_hash(_load(folder), memo)
    model = _load(folder)
    with torch.no_grad():
        model.backbone.ln_f.bias += 1.0
    model.backbone.save_pretrained(folder)  # the same names, other bytes
    os.utime(folder / "model.safetensors", ns=(1, 1))  # even with an old modification time
    assert weights_hash(_load(folder), memo) != base


def test_hub_snapshots_are_identified_by_their_blob_names(folder: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    """A hub cache's snapshot files link to blobs named by their hashes: nothing is read."""
    root = tmp_path / "hub" / "models--org--tiny"
    (root / "blobs").mkdir(parents=True)
    snap = root / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = root / "blobs" / (f"{i}" * 64)
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blob)
    monkeypatch.setattr(W, "sha256_file", lambda p: pytest.fail(f"read {p}"))
    a = weights_hash(_load(snap), None)
    assert a == weights_hash(_load(snap), None)
    assert a != full_weights_hash(_load(snap))  # (the identity is the files', not the bytes')


def test_weights_folder_finds_local_folders_only_without_a_download(folder: Path) -> None:
    assert weights_folder(folder) == folder
    assert weights_folder("org-that-does-not-exist/model") is None


def test_a_model_without_files_is_hashed_by_its_tensors() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        b.weight[1, 1] += 1.0
    assert weights_hash(a) != weights_hash(b)
