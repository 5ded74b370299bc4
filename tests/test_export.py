"""`ecg-distill export / verify / publish`: hub-ready folders of a run's students.

A small fake run is built once per module (the 10-record PTB-XL-layout fixture, a freshly
created tiny leadformer saved as the distilled student, an 8-bit variant of it, and the
results and predictions files the evaluate and quantize stages would write), so every test
runs in seconds; one slow test exports a real tiny run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
import yaml
from conftest import RECORDS, make_ptbxl, run_card_snippet

from distill.cli import main
from distill.core.errors import ECGDistillError

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_exporttest_" + "x" * 24  # a fake token: must never reach a file or a log
NAME, QNAME = "distill leadformer/tiny", "distill leadformer/tiny int8"
FOLDER, QFOLDER = "distill_leadformer-tiny", "distill_leadformer-tiny_int8"


# ---------------------------------------------------------------- a fake run


def _interval(v: float) -> dict[str, float]:
    return {"value": v, "low": v - 0.05, "high": min(v + 0.05, 1.0)}


def _entry(kind: str, folder: Path, auc: float, classes: list[str], **extra) -> dict:
    return {"kind": kind, "student": "leadformer/tiny", "folder": str(folder),
            "macro_auc": _interval(auc), "label_auc": {c: auc for c in classes},
            "fmax": 0.61, "accuracy": 0.5, "thresholds": {c: 0.5 for c in classes},
            "parameters": 12345, "disk_mb": 0.2, "weights_mb": 0.2,
            "peak_memory_mb": {"1": 1.0, "64": 9.0}, "latency_ms": {"1": 0.9, "64": 0.1},
            "vs_teacher": _interval(-0.02), **extra}


def _predictions(model, data, folder: Path) -> None:
    from distill.metrics.scoring import predict
    from distill.data.dataset import SignalView

    view = {"signal": SignalView(leads=tuple(model.config.leads),
                                 sampling_rate=model.config.sampling_rate)}
    out = {}
    for split in ("val", "test"):
        index, probs = predict(model, data.split(split, view), lambda b: {"signal": b["signal"]})
        out[split], out[f"{split}_index"] = probs, index
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "predictions.npz", **out)


def make_fake_run(root: Path, teacher: str = "PKUDigitalHealth/PULSE-7B") -> Path:
    """A run folder as `ecg-distill run` + the quantize stage leave it, made in seconds."""
    from safetensors.torch import save_file
    from transformers import AutoModel, BitsAndBytesConfig

    import students
    from distill.engine.jobs import normalization
    from distill.data.load import load_data
    from distill.recipe import recipe_from_dict, write_resolved

    more_tests = {11: ({"NORM": 100.0}, 10), 12: ({"IMI": 100.0}, 10), 13: ({"CLBBB": 100.0}, 10)}
    data_dir = make_ptbxl(root / "ptbxl", records={**RECORDS, **more_tests}, rates=(100,))
    recipe = recipe_from_dict({
        "name": "fake", "output_dir": str(root / "runs" / "{name}"),
        "data": {"path": str(data_dir), "cache_dir": str(root / "cache")},
        "teacher": {"kind": "vlm", "name_or_path": teacher},
        "students": [{"family": "leadformer", "size": "tiny"}],
        "export": {"license": "apache-2.0"}, "evaluate": {"bootstrap": 20}})
    run = recipe.run_dir
    write_resolved(recipe, run)
    data = load_data(recipe.data, progress=False)
    classes = list(data.classes)
    torch.manual_seed(0)
    model = students.create("leadformer", "tiny", num_labels=len(classes),
                            id2label=dict(enumerate(classes))).eval()
    model.config.normalization = normalization(data)
    best = run / "distill" / "leadformer-tiny" / "best"
    model.save_pretrained(best)
    save_file({"proj.weight": torch.zeros(2, 2)}, str(best / "objective.safetensors"))
    np.savez(best / "val_predictions.npz", probs=np.zeros((2, len(classes))))
    _predictions(model, data, run / "eval" / FOLDER)

    qfolder = run / "quantized" / "leadformer-tiny-int8"
    AutoModel.from_pretrained(best, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_skip_modules=["classifier"])).save_pretrained(qfolder)
    (qfolder / "quantization.json").write_text(json.dumps({"format": "int8"}))
    _predictions(AutoModel.from_pretrained(qfolder).eval(), data,
                 run / "quantized" / "eval" / QFOLDER)

    bootstrap = {"resamples": 20, "seed": 0, "level": 0.95}
    results = {"classes": classes, "test_records": len(data.splits["test"]),
               "bootstrap": bootstrap, "recipe": "fake", "task": "superdiagnostic",
               "models": {"teacher": {"kind": "teacher", "macro_auc": _interval(0.9)},
                          "baseline leadformer/tiny": _entry(
                              "baseline", run / "baseline" / "leadformer-tiny" / "best", 0.7,
                              classes),
                          NAME: _entry("distill", best, 0.8, classes,
                                       vs_baseline=_interval(0.1))}}
    (run / "results.json").write_text(json.dumps(results))
    quantized = {"models": {QNAME: _entry("quantized", qfolder, 0.79, classes, fp32=NAME,
                                          format="int8", vs_fp32=_interval(-0.01),
                                          quantization={"format": "int8"})},
                 "reference": {}, "teacher_memory": {}, "bootstrap": bootstrap}
    (run / "quantized.json").write_text(json.dumps(quantized))
    return run


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("fake"))


@pytest.fixture(scope="module")
def exported(fake_run: Path) -> dict[str, Path]:
    """The default export of the fake run (its folders are not modified by the tests)."""
    from distill.hub.export import export_run

    folders = export_run(fake_run, progress=False)
    return {f.name: f for f in folders}


def _copy_run(fake_run: Path, tmp_path: Path) -> Path:
    """A copy of the run folder (results name the original model folders, found again
    under the copy by their path inside the run)."""
    run = tmp_path / "run"
    shutil.copytree(fake_run, run, ignore=shutil.ignore_patterns("export"))
    return run


# ---------------------------------------------------------------- the folder


def test_default_export_writes_every_distilled_and_quantized_model(exported, fake_run) -> None:
    assert sorted(exported) == [FOLDER, QFOLDER]  # not the teacher, not the baseline
    assert exported[FOLDER].parent == fake_run / "export"
    expected = {"config.json", "model.safetensors", "README.md", "recipe.yaml", "results.json",
                "samples.safetensors", "checksums.sha256", "modeling_ecg_student.py"}
    assert {p.name for p in exported[FOLDER].iterdir()} == expected  # no objective, no npz
    assert {p.name for p in exported[QFOLDER].iterdir()} == expected | {"quantization.json"}
    assert not list((fake_run / "export").glob(".*"))  # no temporary folder left

    config = json.loads((exported[FOLDER] / "config.json").read_text())
    assert config["id2label"] == {"0": "CD", "1": "HYP", "2": "MI", "3": "NORM", "4": "STTC"}
    assert config["leads"][0] == "I" and len(config["leads"]) == 12
    assert config["sampling_rate"] == 100 and config["input_samples"] == 1000
    assert config["normalization"]["kind"] == "global" and len(config["normalization"]["std"]) == 12
    assert "bnb" in json.dumps(json.loads((exported[QFOLDER] / "config.json").read_text())
                               ["quantization_config"])
    recipe = (fake_run / "recipe.yaml").read_bytes()
    assert (exported[FOLDER] / "recipe.yaml").read_bytes() == recipe
    res = json.loads((exported[QFOLDER] / "results.json").read_text())
    assert res["model"] == QNAME and res["macro_auc"]["value"] == 0.79 and res["fp32"] == NAME
    assert res["folder"] == "quantized/leadformer-tiny-int8" and res["classes"][0] == "CD"
    assert str(fake_run) not in (exported[QFOLDER] / "results.json").read_text()

    from distill.core.hashing import sha256_file

    lines = (exported[FOLDER] / "checksums.sha256").read_text().splitlines()
    assert len(lines) == len(expected) - 1
    for line in lines:
        digest, name = line.split("  ")
        assert sha256_file(exported[FOLDER] / name) == digest


@pytest.mark.parametrize("folder, auc, tags", [(FOLDER, 0.8, set()),
                                               (QFOLDER, 0.79, {"bitsandbytes", "8-bit", "int8"})])
def test_card_metadata_parses_back_with_huggingface_hub(exported, folder, auc, tags) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported[folder] / "README.md")
    d = card.data
    assert d.license == "apache-2.0" and d.library_name == "transformers"
    assert d.base_model == "PKUDigitalHealth/PULSE-7B"
    assert d.datasets == ["ptbxl"]
    assert {"ecg", "knowledge-distillation", "leadformer", "superdiagnostic"} | tags <= set(d.tags)
    assert d.model_name == folder
    (result,) = d.eval_results
    assert result.metric_type == "roc_auc" and result.dataset_split == "test"
    assert result.metric_value == pytest.approx(auc)
    assert result.metric_args["ci_low"] == pytest.approx(auc - 0.05)
    assert result.metric_args["ci_high"] == pytest.approx(auc + 0.05)
    assert result.metric_args["ci_level"] == 0.95
    assert f"| macro AUROC | {auc:.3f} [{auc - 0.05:.3f}, {auc + 0.05:.3f}] |" in card.text


def test_a_teacher_that_is_no_hub_id_is_named_not_linked(fake_run) -> None:
    from huggingface_hub import ModelCard

    from distill.hub.model_card import model_card
    from distill.recipe import read_yaml, recipe_from_dict

    recipe = recipe_from_dict({**read_yaml(fake_run / "recipe.yaml"),
                               "teacher": {"name_or_path": "tiny"}})
    results = json.loads((fake_run / "results.json").read_text())
    config = json.loads((fake_run / "distill/leadformer-tiny/best/config.json").read_text())
    card = ModelCard(str(model_card(NAME, results["models"][NAME], results, recipe, config)))
    assert card.data.base_model is None and card.data.to_dict()["teacher"] == "tiny"


def test_card_snippet_runs_as_written_in_a_fresh_process(exported, fake_run, tmp_path) -> None:
    """The usage snippet, with its MODEL and RECORD set, prints each label's probability:
    the model's output on the record as preprocessed by the training data path."""
    from safetensors.torch import load_file

    folder = exported[FOLDER]
    samples = load_file(folder / "samples.safetensors")
    ecg_id = int(samples["ecg_id"][0])
    record = fake_run.parent.parent / "ptbxl" / "records100" / "00000" / f"{ecg_id:05d}_lr"
    printed = run_card_snippet((folder / "README.md").read_text(), str(folder), str(record),
                               tmp_path)
    assert list(printed) == ["CD", "HYP", "MI", "NORM", "STTC"]

    # the first stored test record: the snippet's probabilities are the run's stored ones
    for got, want in zip(printed.values(), samples["probabilities"][0].tolist()):
        assert float(got) == pytest.approx(want, abs=1e-3)


def test_prepare_record_matches_the_training_input(exported, fake_run) -> None:
    """students.preprocess on each stored test record's WFDB file gives the input the run's
    evaluation used; a lead subset at another rate is picked, scaled, resampled and padded."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    import students  # noqa: F401
    from students.preprocess import prepare_record, prepare_signal

    samples = load_file(exported[FOLDER] / "samples.safetensors")
    config = AutoConfig.from_pretrained(exported[FOLDER])
    records = fake_run.parent.parent / "ptbxl" / "records100" / "00000"
    for i, ecg_id in enumerate(samples["ecg_id"].tolist()):
        got = prepare_record(records / f"{ecg_id:05d}_lr", config)
        assert got.shape == (1, 12, 1000)
        torch.testing.assert_close(got[0], samples["signal"][i], atol=1e-5, rtol=0)

    # a lead subset at another rate: picked in the model's order, resampled, scaled, padded
    cfg = config.to_dict() | {"leads": ["V1", "I"], "sampling_rate": 50, "input_samples": 600}
    signal = np.random.default_rng(0).normal(size=(12, 1000)).astype(np.float32)
    x = prepare_signal(signal, 100, cfg)
    assert x.shape == (2, 600) and np.all(x[:, 500:] == 0)
    norm = config.normalization
    first_v1 = (signal[6, :2].mean() - norm["mean"][6]) / norm["std"][6]
    assert abs(x[0, 0] - first_v1) < 1.0  # V1 comes first, scaled with V1's statistics


# ---------------------------------------------------------------- verification


def test_verify_command_loads_the_folder_in_a_fresh_process(exported, capsys) -> None:
    # (the fixture's export verified the quantized folder in a fresh process too)
    assert main(["verify", str(exported[FOLDER])]) == 0
    out = capsys.readouterr().out
    assert "ok: 7 files match checksums.sha256; loads with AutoModel; 4 stored test " in out


def test_verification_catches_changed_files(exported, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from distill.hub.publish import check_folder, write_manifest

    report = check_folder(exported[QFOLDER])
    assert report["ok"] and report["quantized"] and report["samples"] == 4
    assert report["max_abs_diff"] <= report["atol"]

    folder = Path(shutil.copytree(exported[FOLDER], tmp_path / "copy"))
    (folder / "pytorch_model.bin").write_bytes(b"a pickle")
    problems = check_folder(folder)["problems"]
    assert problems == ["pytorch_model.bin: not listed in checksums.sha256",
                        ("pytorch_model.bin: pickle file (refused; weights are read and shipped "
                        "as safetensors only)")]
    (folder / "pytorch_model.bin").unlink()

    # other weights, consistent checksums: the stored test predictions are not reproduced
    weights = load_file(folder / "model.safetensors")
    weights = {k: v + 0.5 if k.startswith("classifier") else v for k, v in weights.items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert check_folder(folder)["problems"] == [("model.safetensors: checksum differs from "
                                                "checksums.sha256")]
    write_manifest(folder)
    (problem,) = check_folder(folder)["problems"]
    assert problem.startswith("samples.safetensors: predictions differ from the run's stored "
                              "test predictions by up to")


# ---------------------------------------------------------------- refusals


def test_existing_export_is_kept_without_force_and_replaced_whole_with_it(
        exported, fake_run, tmp_path, monkeypatch, capsys) -> None:
    from distill.hub import export

    run = _copy_run(fake_run, tmp_path)
    folder = run / "export" / FOLDER
    shutil.copytree(fake_run / "export" / FOLDER, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    capsys.readouterr()
    assert main(["export", str(run), "--quiet"]) == 2  # FOLDER exists: nothing is written
    err = capsys.readouterr().err
    assert err.strip() == f"error: {folder} exists; pass --force to replace it"
    assert not (run / "export" / QFOLDER).exists()

    def failing(paths):
        raise ECGDistillError(f"{paths[0]}: verification failed: test")

    monkeypatch.setattr(export, "verify_folders", failing)
    with pytest.raises(ECGDistillError, match="verification failed"):
        export.export_run(run, models=[FOLDER], force=True, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # old export intact
    assert sorted(p.name for p in (run / "export").iterdir()) == [FOLDER]  # no temp folder

    # (a real verification is the fixture's export; here: what is verified is what lands)
    verified = []
    monkeypatch.setattr(export, "verify_folders", lambda paths: verified.extend(
        {p.name: p.read_bytes() for p in Path(f).iterdir()} for f in paths))
    (run / "results.json").write_text((run / "results.json").read_text().replace("0.8", "0.81"))
    assert export.export_run(run, models=[NAME], force=True, progress=False) == [folder]
    assert json.loads((folder / "results.json").read_text())["macro_auc"]["value"] == 0.81
    assert verified == [{p.name: p.read_bytes() for p in folder.iterdir()}]


@pytest.mark.parametrize("model, message", [
    ("teacher", "--model 'teacher': the teacher is not exported"),
    ("distill xresnet1d/tiny", ("--model 'distill xresnet1d/tiny': not in the run's results; "
                               "known: teacher, baseline leadformer/tiny, distill leadformer/tiny, "
                               "distill leadformer/tiny int8")),
])
def test_export_refuses_the_teacher_and_unknown_models(fake_run, model, message, capsys) -> None:
    assert main(["export", str(fake_run), "--model", model, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_pickle_checkpoints_are_refused_with_one_line(fake_run, tmp_path, capsys) -> None:
    run = _copy_run(fake_run, tmp_path)
    best = run / "distill" / "leadformer-tiny" / "best"
    (best / "model.safetensors").unlink()
    (best / "objective.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, best / "pytorch_model.bin")
    assert main(["export", str(run), "--model", NAME, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {best}: no model.safetensors (found pytorch_model.bin: pickle "
                   f"weights are refused, only safetensors are read)\n")
    assert not (run / "export").exists()


# ---------------------------------------------------------------- publishing to a directory


def test_publish_to_a_local_directory_like_a_hub_repository(exported, tmp_path, capsys,
                                                            monkeypatch) -> None:
    from huggingface_hub import snapshot_download
    from transformers import AutoModel

    import students  # noqa: F401
    from distill.hub import publish

    # (verification before publishing runs for real in the hub and refusal tests)
    checked = []
    monkeypatch.setattr(publish, "verify_folder", lambda f: checked.append(f) or {"ok": True})
    to = tmp_path / "hub"
    args = ["publish", str(exported[FOLDER]), "--repo-id", "ecg-org/leadformer-tiny", "--to",
            str(to)]
    assert main(args) == 0
    assert "published" in capsys.readouterr().out and checked == [exported[FOLDER]]
    snapshot = Path(snapshot_download("ecg-org/leadformer-tiny", cache_dir=to,
                                      local_files_only=True))
    files = {p.name: p.read_bytes() for p in exported[FOLDER].iterdir()}
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == files  # byte-identical
    # (by id, transformers still asks the hub for an adapter unless HF_HUB_OFFLINE=1 is set
    # before it is imported: the README's air-gapped recipe sets it with HF_HUB_CACHE=DIR)
    model = AutoModel.from_pretrained(snapshot)
    assert model.config.leads[0] == "I"

    assert main(args) == 2  # main exists: refused before anything is verified or written
    err = capsys.readouterr().err
    assert err == (f"error: ecg-org/leadformer-tiny: revision 'main' exists in {to} "
                   f"({to}/models--ecg-org--leadformer-tiny/refs/main); pass --force to publish "
                   f"over it, or choose another --revision\n")
    # the writing itself (verification is the same as above)
    from distill.hub.publish import publish_local

    out = publish_local(exported[FOLDER], "ecg-org/leadformer-tiny", to, revision="v1")
    assert out["commit"] == snapshot.name  # same files, same commit
    with pytest.raises(ECGDistillError, match="revision 'v1' exists"):
        publish_local(exported[QFOLDER], "ecg-org/leadformer-tiny", to, revision="v1")
    out = publish_local(exported[QFOLDER], "ecg-org/leadformer-tiny", to, revision="v1",
                        force=True)
    assert (to / "models--ecg-org--leadformer-tiny" / "refs" / "v1").read_text() == out["commit"]
    again = Path(snapshot_download("ecg-org/leadformer-tiny", revision="v1", cache_dir=to,
                                   local_files_only=True))
    assert (again / "quantization.json").is_file() and again != snapshot


def test_a_folder_that_fails_verification_is_not_published(exported, tmp_path) -> None:
    from distill.hub.publish import publish_folder

    folder = Path(shutil.copytree(exported[FOLDER], tmp_path / "copy"))
    with open(folder / "config.json", "a") as f:
        f.write("\n")
    with pytest.raises(ECGDistillError, match="config.json: checksum differs"):
        publish_folder(folder, "ecg-org/x", to=tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


# ---------------------------------------------------------------- publishing to a hub


class FakeHub:
    """Just enough of the hub's HTTP API for ``create_repo`` + ``upload_folder``: repository
    info, revision info, repository and branch creation, YAML validation, the preupload
    query (every file goes as a regular, non-LFS file), the commit, and the file tree."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> branch -> files
        self.private: dict[str, bool] = {}
        self.authorization: set[str] = set()
        self.commits = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub.handle(self, "GET")

            def do_POST(self) -> None:
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def reply(h, status: int, body, error_code: str | None = None) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if error_code:
            h.send_header("X-Error-Code", error_code)
        h.end_headers()
        h.wfile.write(data)

    def handle(self, h, method: str) -> None:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.authorization.add(h.headers.get("Authorization", ""))
        path = unquote(urlparse(h.path).path)
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}"
            if repo in self.repos:
                return self.reply(h, 409, {"error": "You already created this model repo"})
            self.repos[repo] = {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}}
            self.private[repo] = req.get("visibility") == "private"
            return self.reply(h, 200, {"url": f"{self.url}/{repo}", "name": repo})
        if method == "POST" and path == "/api/validate-yaml":
            return self.reply(h, 200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|preupload|commit|branch|tree)"
                         r"/([^/]+))?", path)
        if m is None:
            return self.reply(h, 404, {"error": f"no route {method} {path}"})
        repo, action, rev = m.groups()
        if repo not in self.repos:
            return self.reply(h, 404, {"error": "Repository not found"}, "RepoNotFound")
        branches = self.repos[repo]
        if action is None:
            return self.reply(h, 200, {"id": repo, "sha": "0" * 40, "private": self.private[repo]})
        if action == "branch":
            branches[rev] = dict(branches["main"])
            return self.reply(h, 200, {})
        if rev not in branches:
            return self.reply(h, 404, {"error": "Revision not found"}, "RevisionNotFound")
        files = branches[rev]
        if action == "revision":
            return self.reply(h, 200, {"id": repo, "sha": "1" * 40})
        if action == "tree":
            return self.reply(h, 200, [{"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                                       for p, b in files.items()])
        if action == "preupload":
            return self.reply(h, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for f in json.loads(body)["files"]]})
        for line in body.decode().splitlines():  # the commit: ndjson
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return self.reply(h, 400, {"error": f"unexpected {item['key']}"})
        self.commits += 1
        oid = f"{self.commits:040x}"
        return self.reply(h, 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}",
                                   "commitOid": oid, "success": True})


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def _publish(folder: Path, hub: FakeHub, home: Path, *extra: str) -> subprocess.CompletedProcess:
    """`ecg-distill publish` in its own process, the token in HF_TOKEN, a private HF_HOME."""
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "distill", "publish", str(folder), "--repo-id",
                           "ecg-org/leadformer-tiny", "--endpoint", hub.url, *extra],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
                          check=False)


def test_publish_uploads_byte_identical_files_through_huggingface_hub(
        exported, hub, tmp_path, monkeypatch) -> None:
    from distill.hub import publish

    folder, home = exported[FOLDER], tmp_path / "hf-home"
    proc = _publish(folder, hub, home, "--private")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = hub.repos["ecg-org/leadformer-tiny"]["main"]
    assert hub.private["ecg-org/leadformer-tiny"]
    for p in folder.iterdir():
        assert files[p.name] == p.read_bytes(), p.name
    assert f"Bearer {TOKEN}" in hub.authorization  # huggingface_hub found the token itself

    again = _publish(folder, hub, home)  # main exists now: refused, nothing sent
    assert again.returncode == 2 and hub.commits == 1
    assert again.stderr.strip() == (f"error: ecg-org/leadformer-tiny: revision 'main' exists on "
                                    f"{hub.url}; pass --force to publish over it, or choose "
                                    f"another --revision")

    # the token was only ever sent in a header: not in any output, file or log
    for p in (proc, again):
        assert TOKEN not in p.stdout + p.stderr
    for root in (home, folder, tmp_path):
        for p in root.rglob("*"):
            if p.is_file():
                assert TOKEN.encode() not in p.read_bytes(), p

    # --force and a new branch (in this process; verification as above). CI runs the suite
    # with HF_HUB_OFFLINE=1, which huggingface_hub read at import: lift it for the local hub
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a release that reads it per call
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.setattr(publish, "verify_folder", lambda f: {"ok": True})
    files["stale.txt"] = b"from an earlier upload"
    publish.publish_folder(folder, "ecg-org/leadformer-tiny", force=True, endpoint=hub.url)
    assert "stale.txt" not in files and ".gitattributes" in files  # the folder, exactly
    assert hub.commits == 2
    publish.publish_folder(exported[QFOLDER], "ecg-org/leadformer-tiny", revision="v1",
                           endpoint=hub.url)
    v1 = hub.repos["ecg-org/leadformer-tiny"]["v1"]
    assert v1["quantization.json"] == (exported[QFOLDER] / "quantization.json").read_bytes()
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()  # main kept


def test_hub_errors_are_one_line(exported, hub, tmp_path) -> None:
    from distill.hub.publish import publish_folder

    hub.close()  # nothing listens any more
    with pytest.raises(ECGDistillError, match=r"^ecg-org/leadformer-tiny: checking the "
                                              r"repository failed: ") as info:
        publish_folder(exported[FOLDER], "ecg-org/leadformer-tiny", endpoint=hub.url)
    assert "\n" not in str(info.value)
    with pytest.raises(ECGDistillError, match="--repo-id 'no-slash': expected 'org/name'"):
        publish_folder(exported[FOLDER], "no-slash", endpoint=hub.url)


# ---------------------------------------------------------------- a real run


@pytest.mark.slow
def test_export_a_real_tiny_run(tmp_path) -> None:
    """`ecg-distill run` on a small recipe, then export: the folder verifies, and its card's
    snippet preprocesses a raw test record into exactly the input the run evaluated."""
    import pandas as pd
    from safetensors.torch import load_file
    from transformers import AutoConfig

    import students  # noqa: F401
    from students.preprocess import prepare_record

    d = {"name": "tiny", "output_dir": str(tmp_path / "runs" / "{name}"),
         "data": {"synthetic": {"records": 120, "seed": 3}, "cache_dir": str(tmp_path / "cache")},
         "teacher": {"kind": "vlm", "name_or_path": "tiny", "train_mode": "full", "epochs": 1},
         "students": [{"family": "leadformer", "size": "tiny", "view": {"sampling_rate": 50}}],
         "distill": {"mhca": {"dim": 32, "heads": 2}, "ot": {"dim": 32, "iters": 10}},
         "train": {"epochs": 1, "batch_size": 32},
         "quantize": {"formats": []},  # (quantized folders: the fake run's tests; this saves 20 s)
         "export": {"enabled": False},  # exported below by the command, not the run's stage
         "evaluate": {"bootstrap": 20, "latency_repeats": 1}}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(d))
    assert main(["run", str(recipe), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    assert main(["export", str(run), "--quiet"]) == 0
    folders = sorted((run / "export").iterdir())
    assert [f.name for f in folders] == [FOLDER]
    config = AutoConfig.from_pretrained(folders[0])
    assert config.sampling_rate == 50 and config.input_samples == 500
    samples = load_file(folders[0] / "samples.safetensors")
    db = next((tmp_path / "cache" / "synthetic").iterdir())
    files = pd.read_csv(db / "ptbxl_database.csv", index_col="ecg_id")["filename_lr"]
    for i, ecg_id in enumerate(samples["ecg_id"].tolist()):
        got = prepare_record(db / files[ecg_id], config)[0]
        torch.testing.assert_close(got, samples["signal"][i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [FOLDER, QFOLDER])
def test_an_exported_folder_loads_in_an_environment_without_ecg_distill(exported, name,
                                                                        tmp_path) -> None:
    """A fresh virtual environment whose only packages are this one's installed libraries
    (torch, transformers, bitsandbytes ...; not ecg-distill, whose editable install is a
    .pth hook that a path added this way does not run): the folder's own code loads with
    trust_remote_code and reproduces the stored predictions."""
    import site

    from distill.hub.portable import MODELING_FILE

    folder = exported[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_ecg_student.LeadFormerConfig",
                                  "AutoModel": "modeling_ecg_student.LeadFormerModel"}
    code_text = (folder / MODELING_FILE).read_text()
    assert not re.search(r"^\s*(from|import) (distill|students|teachers)\b", code_text,
                         flags=re.MULTILINE)
    assert MODELING_FILE in (folder / "checksums.sha256").read_text()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    (Path(target) / "installed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    probe = f"""
import importlib.util, json
for name in ("distill", "students", "teachers"):
    assert importlib.util.find_spec(name) is None, name + " is importable"
import torch
from safetensors.torch import load_file
from transformers import AutoModel
folder = {str(folder)!r}
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
s = load_file(folder + "/samples.safetensors")
with torch.no_grad():
    p = torch.sigmoid(model(signal=s["signal"]).logits.float())
print(json.dumps({{"diff": float((p - s["probabilities"]).abs().max()),
                  "module": type(model).__module__}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf-modules")
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules")
    assert out["diff"] <= (1e-2 if name == QFOLDER else 1e-4), out
