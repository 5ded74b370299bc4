"""Checking and publishing an exported folder (see :mod:`distill.hub.export` for how one is made).

An exported folder is trusted only after :func:`verify_folder`, which runs in a fresh
Python process (``python -m distill.hub.publish FOLDER``: nothing of the exporting process,
no token, hub access switched off) and checks that

1. every file matches the checksum manifest (``checksums.sha256``, ``sha256sum -c``
   format) and no file outside it is present (no pickle weights anywhere);
2. the config carries what a user needs (labels, leads, rate, input length, scaling);
3. the model loads with ``AutoModel.from_pretrained(folder)`` after ``import students``
   (a quantized folder through its ``quantization_config``), or, for an ONNX folder
   (``model.onnx``), with onnxruntime;
4. it reproduces the run's stored test predictions for the records kept in
   ``samples.safetensors`` (their inputs and expected probabilities).

:func:`publish_folder` verifies, then uploads through ``huggingface_hub``
(``HfApi.create_repo`` + ``upload_folder``) or, with ``to``, writes a local directory laid
out like the hub client's cache (``models--org--name/{blobs,snapshots,refs}``), which
``from_pretrained("org/name", cache_dir=DIR)`` reads offline. The token is whatever
``huggingface_hub`` resolves itself (``HF_TOKEN``, ``hf auth login``); this module never
reads, prints or stores it. A revision that exists already is not written over without
``force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from distill.core.errors import ECGDistillError
from distill.core.hashing import sha256_file
from distill.core.io import PICKLE_SUFFIXES, atomic_write_text, pickle_files, require_safetensors  # noqa: F401
import students  # noqa: F401  (registers the student classes with AutoModel)
from distill.compress.onnx import ONNX_FILE, OnnxStudent, is_onnx_folder, read_contract

MANIFEST = "checksums.sha256"
SAMPLES = "samples.safetensors"
CONFIG_KEYS = ("id2label", "leads", "sampling_rate", "input_samples", "normalization")
# extensions of pickle-based checkpoints (torch.save, joblib ...): never read, never shipped
DEFAULT_REVISION = "main"
_REVISION = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
VERIFY_TIMEOUT_S = 600


# ---------------------------------------------------------------- weights and checksums


def _folder_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write ``checksums.sha256``: the SHA-256 of every other file of ``folder``, one
    ``<hex>  <name>`` line each (``sha256sum -c checksums.sha256`` checks it too)."""
    folder = Path(folder)
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in _folder_files(folder)]
    return atomic_write_text(folder / MANIFEST, "".join(lines))


def read_manifest(folder: Path) -> dict[str, str]:
    """name -> sha256 of the manifest; ECGDistillError when it is missing or malformed."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ECGDistillError(f"{folder}: no {MANIFEST}; not an exported folder "
                              f"(make one with `ecg-distill export RUN`)")
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip())
        if not m:
            raise ECGDistillError(f"{path}: line {n} is not '<sha256>  <file>'")
        out[m.group(2)] = m.group(1)
    return out


def check_manifest(folder: Path) -> list[str]:
    """Problems found comparing ``folder`` with its manifest (empty: every file matches)."""
    try:
        listed = read_manifest(folder)
    except ECGDistillError as exc:
        return [str(exc)]
    present = set(_folder_files(folder))
    names = set(listed)
    problems = [f"{name}: listed in {MANIFEST} but missing" for name in sorted(names - present)]
    problems += [f"{name}: not listed in {MANIFEST}" for name in sorted(present - names)]
    problems += [f"{name}: checksum differs from {MANIFEST}" for name in sorted(present & names)
                 if sha256_file(folder / name) != listed[name]]
    return problems


# ---------------------------------------------------------------- verification


def check_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Check an exported folder in this process (what :func:`verify_folder` runs in a fresh
    one). Returns ``{"ok", "problems", "samples", "max_abs_diff", "atol", "quantized"}``."""
    folder = Path(folder)
    report: dict[str, Any] = {"folder": str(folder), "problems": [], "samples": 0,
                              "max_abs_diff": None, "atol": None, "quantized": False}
    problems = report["problems"]
    if not folder.is_dir():
        problems.append(f"{folder}: not a folder")
        return {**report, "ok": False}
    problems += check_manifest(folder)
    problems += [f"{name}: pickle file (refused; weights are read and shipped as safetensors "
                 f"only)" for name in pickle_files(folder)]
    if problems:  # an altered folder is not loaded at all
        return {**report, "ok": False}
    try:
        config = json.loads((folder / "config.json").read_text())
        missing = [k for k in CONFIG_KEYS if not config.get(k)]
        if missing:
            problems.append(f"config.json: missing {', '.join(missing)}")
        report["quantized"] = bool(config.get("quantization_config"))
        if not is_onnx_folder(folder):
            require_safetensors(folder)
        _check_predictions(folder, report)
    except Exception as exc:  # noqa: BLE001 - loading fails in many ways: report, not crash
        first = (str(exc).strip().splitlines() or [""])[0]
        problems.append(f"loading failed: {type(exc).__name__}: {first}")
    report["ok"] = not problems
    return report


def _check_predictions(folder: Path, report: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from safetensors import safe_open
    from transformers import AutoModel

    if is_onnx_folder(folder):
        model = OnnxStudent(folder)
        report["quantized"] = read_contract(folder / ONNX_FILE)["format"] != "onnx"
    else:
        model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
    samples = folder / SAMPLES
    if not samples.is_file():
        report["problems"].append(f"{SAMPLES}: missing; nothing to reproduce")
        return
    with safe_open(str(samples), framework="pt") as f:
        meta = f.metadata() or {}
        key = "image" if "image" in f.keys() else "signal"  # a printout or a signal student
        signal, expected = f.get_tensor(key), f.get_tensor("probabilities")
    atol = float(meta.get("atol", 1e-4))
    with torch.no_grad():
        device = next(model.parameters()).device
        probs = torch.sigmoid(model(**{key: signal.to(device)}).logits.float()).cpu()
    if probs.shape != expected.shape:
        report["problems"].append(f"{SAMPLES}: model gives {list(probs.shape)} probabilities, "
                                  f"{list(expected.shape)} stored")
        return
    diff = float((probs - expected).abs().max()) if probs.numel() else 0.0
    report.update(samples=int(signal.shape[0]), max_abs_diff=diff, atol=atol)
    if not np.isfinite(diff) or diff > atol:
        report["problems"].append(f"{SAMPLES}: predictions differ from the run's stored test "
                                  f"predictions by up to {diff:.2e} (tolerance {atol:.0e})")


def verify_folder(folder: str | os.PathLike, *,
                  timeout: float = VERIFY_TIMEOUT_S) -> dict[str, Any]:
    """Verify an exported folder in a fresh Python process (see the module docstring).

    The child gets no hub token and hub access is off (``HF_HUB_OFFLINE=1``): what it loads
    is the folder and nothing else.

    Returns:
        The child's report (``ok`` is True).

    Raises:
        ECGDistillError: one line naming the folder and the first problem found.
    """
    return verify_folders([folder], timeout=timeout)[0]


def verify_folders(folders: list[str | os.PathLike], *,
                   timeout: float = VERIFY_TIMEOUT_S) -> list[dict[str, Any]]:
    """:func:`verify_folder` for several folders in one fresh process (one start-up)."""
    paths = [str(Path(f).resolve()) for f in folders]
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, "-m", "distill.hub.publish", *paths],
                              capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ECGDistillError(f"{paths[0]}: verification did not finish in {timeout:g} s") from None
    lines = proc.stdout.strip().splitlines()
    try:
        reports = json.loads(lines[-1])
        assert isinstance(reports, list) and len(reports) == len(paths)
    except (IndexError, ValueError, AssertionError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ECGDistillError(f"{paths[0]}: verification process failed (exit "
                              f"{proc.returncode}): {tail}") from None
    for path, report in zip(paths, reports):
        if not report.get("ok"):
            n = len(report["problems"])
            more = f" (and {n - 1} more problem(s))" if n > 1 else ""
            raise ECGDistillError(f"{path}: verification failed: {report['problems'][0]}{more}")
    return reports


# ---------------------------------------------------------------- publishing


def _check_target(repo_id: str, revision: str) -> None:
    if not _REPO_ID.match(repo_id):
        raise ECGDistillError(f"--repo-id {repo_id!r}: expected 'org/name' (letters, digits, "
                              f"'.', '_', '-')")
    if not _REVISION.match(revision) or ".." in revision:
        raise ECGDistillError(f"--revision {revision!r}: not a valid branch name")


def publish_folder(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None,
                   private: bool = False, force: bool = False, to: str | os.PathLike | None = None,
                   endpoint: str | None = None,
                   commit_message: str | None = None) -> dict[str, Any]:
    """Verify an exported folder, then publish it to a hub repository (or a local one).

    Args:
        folder: an exported folder (``ecg-distill export``).
        repo_id: ``org/name``.
        revision: the branch to publish to (default ``main``); created when missing.
        private: create the repository private (an existing one keeps its visibility).
        force: publish over a revision that exists already (on the hub, files the folder
            does not have are deleted from it, so the revision holds exactly the folder).
        to: publish into this local directory instead of the hub.
        endpoint: the hub's URL (default: ``HF_ENDPOINT`` or huggingface.co).
        commit_message: default "Upload <folder name> with ecg-distill".

    Returns:
        ``{"repo_id", "revision", "commit", "url" | "path", "verified": report}``.

    Raises:
        ECGDistillError: verification failed, the revision exists (without ``force``), or
        the hub refused a request (one line; the token never appears).
    """
    folder = Path(folder)
    revision = revision or DEFAULT_REVISION
    _check_target(repo_id, revision)
    message = commit_message or f"Upload {folder.resolve().name} with ecg-distill"
    # a refused target is found before the (slower) verification; nothing is sent before it
    if to is not None:
        _refuse_local_revision(repo_id, Path(to), revision, force)
        report = verify_folder(folder)
        out = publish_local(folder, repo_id, Path(to), revision=revision, force=force)
    else:
        target = _hub_target(repo_id, revision=revision, private=private, force=force,
                             endpoint=endpoint)
        report = verify_folder(folder)
        out = _upload_hub(folder, target, message=message)
    return {**out, "repo_id": repo_id, "revision": revision, "verified": report}


def _hub_call(repo_id: str, what: str, fn, /, *args, **kwargs):
    """Run one huggingface_hub call; its errors become one line (no token is ever in them:
    the library keeps it in request headers, which its messages do not show)."""
    import importlib.util

    from huggingface_hub.errors import HfHubHTTPError

    # the HTTP client's own errors (refused connection, timeout): httpx2 in huggingface_hub
    # 2.x, httpx in 1.x (requests' errors are OSErrors)
    transport = tuple(importlib.import_module(m).HTTPError for m in ("httpx2", "httpx")
                      if importlib.util.find_spec(m))
    try:
        return fn(*args, **kwargs)
    except (HfHubHTTPError, OSError, ValueError, *transport) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ECGDistillError(f"{repo_id}: {what} failed: {first}") from None


def _hub_target(repo_id: str, *, revision: str, private: bool, force: bool,
                endpoint: str | None) -> dict[str, Any]:
    """Where an upload goes and what exists there already; refuses an existing revision
    without ``force``."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint)
    existed = _hub_call(repo_id, "checking the repository", api.repo_exists, repo_id)
    has_revision = existed and _hub_call(repo_id, "checking the revision", api.revision_exists,
                                         repo_id, revision)
    if has_revision and not force:
        raise ECGDistillError(f"{repo_id}: revision {revision!r} exists on {api.endpoint}; "
                              f"pass --force to publish over it, or choose another --revision")
    if existed and private:
        print(f"note: {repo_id} exists; its visibility is left as it is")
    return {"api": api, "repo_id": repo_id, "revision": revision, "existed": existed,
            "has_revision": has_revision, "private": private}


def _upload_hub(folder: Path, target: dict[str, Any], *, message: str) -> dict[str, Any]:
    api, repo_id, revision = target["api"], target["repo_id"], target["revision"]
    has_revision = target["has_revision"]
    if not target["existed"]:
        _hub_call(repo_id, "creating the repository", api.create_repo, repo_id,
                  private=target["private"] or None, repo_type="model")
        has_revision = revision == DEFAULT_REVISION  # a new repository has its main branch
    if not has_revision:
        _hub_call(repo_id, f"creating branch {revision!r}", api.create_branch, repo_id,
                  branch=revision, exist_ok=True)
    info = _hub_call(repo_id, "uploading", api.upload_folder, repo_id=repo_id,
                     folder_path=str(folder), revision=revision, commit_message=message,
                     # over an existing revision (--force): it then holds exactly the folder
                     delete_patterns=["*"] if target["has_revision"] else None)
    return {"url": f"{api.endpoint}/{repo_id}", "commit": info.oid,
            "commit_url": info.commit_url}


def _local_repo(to: Path, repo_id: str) -> Path:
    return to / ("models--" + repo_id.replace("/", "--"))


def _refuse_local_revision(repo_id: str, to: Path, revision: str, force: bool) -> None:
    ref = _local_repo(to, repo_id) / "refs" / revision
    if ref.exists() and not force:
        raise ECGDistillError(f"{repo_id}: revision {revision!r} exists in {to} ({ref}); pass "
                              f"--force to publish over it, or choose another --revision")


def publish_local(folder: Path, repo_id: str, to: Path, *, revision: str = DEFAULT_REVISION,
                  force: bool = False) -> dict[str, Any]:
    """Write ``folder`` into ``to`` laid out like the hub client's cache of a repository::

        to/models--org--name/blobs/<sha256>                  each file once, by content
        to/models--org--name/snapshots/<commit>/<file>       -> ../../blobs/<sha256>
        to/models--org--name/refs/<revision>                 the commit of the revision

    so ``AutoModel.from_pretrained("org/name", revision=..., cache_dir=to,
    local_files_only=True)`` (or ``HF_HUB_CACHE=to`` with ``HF_HUB_OFFLINE=1``) loads it,
    and the directory can be carried to an air-gapped site as it is. The commit id is a
    hash of the manifest, so publishing the same folder twice gives the same commit.

    Raises:
        ECGDistillError: ``refs/<revision>`` exists and ``force`` is False.
    """
    _check_target(repo_id, revision)
    _refuse_local_revision(repo_id, to, revision, force)
    repo = _local_repo(to, repo_id)
    ref = repo / "refs" / revision
    manifest = (folder / MANIFEST).read_text()
    commit = hashlib.sha1(f"ecg-distill local publish\n{manifest}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        tmp = repo / "snapshots" / f".tmp-{commit}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for name in [*_folder_files(folder), MANIFEST]:
                blob = repo / "blobs" / sha256_file(folder / name)
                if not blob.exists():
                    blob.parent.mkdir(parents=True, exist_ok=True)
                    part = blob.with_name(f".{blob.name}.{os.getpid()}.tmp")
                    shutil.copyfile(folder / name, part)
                    os.replace(part, blob)
                link = tmp / name
                link.parent.mkdir(parents=True, exist_ok=True)
                try:
                    link.symlink_to(os.path.relpath(blob, link.parent))
                except OSError:  # no symlinks (Windows without developer mode): a copy
                    shutil.copyfile(blob, link)
            os.replace(tmp, snapshot)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(ref, commit)
    return {"path": str(snapshot), "commit": commit}


if __name__ == "__main__":  # the fresh process of verify_folders: one JSON line on stdout
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    print(json.dumps([check_folder(folder) for folder in sys.argv[1:]]))
