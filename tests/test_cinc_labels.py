"""CinC SNOMED CT codes mapped onto PTB-XL statements and tasks (distill/data/tables/snomed_scp.csv),
checked on real CinC 2021 records that are PTB-XL records."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import students
from distill.cli import main
from distill.core.errors import DataError, ECGDistillError, RecipeError
from distill.data import cinc, load_cinc, ptbxl

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "data" / "real-ecg" / "cinc2021-ptbxl-500hz"  # HR06000-HR06003
SHARED = REPO.parent / "shared" / "data"
SHARED_CINC = SHARED / "real-ecg" / "cinc2021-ptbxl-500hz"  # HR06000-HR06009
# scp_codes keys of PTB-XL 1.0.3 ecg_id 6000-6009 (ptbxl_database.csv), the records the
# challenge redistributed as HR06000-HR06009 (same age and sex in the headers).
PTBXL_CODES = {
    6000: {"NORM", "NT_", "SR"}, 6001: {"NST_", "SR"}, 6002: {"NORM", "IRBBB", "SBRAD"},
    6003: {"NORM", "STACH"}, 6004: {"NORM", "SR"}, 6005: {"NORM", "SR"},
    6006: {"NORM", "SR"}, 6007: {"NORM", "SR"}, 6008: {"NORM", "SR"}, 6009: {"NORM", "SR"},
}
SUPER = ["CD", "HYP", "MI", "NORM", "STTC"]


def test_table_rows_give_ptbxl_statements_and_classes() -> None:
    table = cinc.read_mapping()
    assert len(table) == 133 and table.index.is_unique
    assert table.at["164889003", "scp_codes"] == ("AFIB",)
    assert table.at["270492004", "scp_codes"] == ("1AVB",)
    rhythm = cinc.code_labels("rhythm")
    assert rhythm["164889003"] == ("label", frozenset({"AFIB"}))
    assert rhythm["164865005"][0] == "none"  # MI is no rhythm
    sup = cinc.code_labels("superdiagnostic")
    assert sup["164865005"] == ("label", frozenset({"MI"}))  # every MI statement: class MI
    assert sup["164909002"] == ("label", frozenset({"CD"}))  # LBBB -> CLBBB -> CD
    assert sup["426783006"] == ("alone", frozenset({"NORM"}))
    assert sup["39732003"][0] == "neutral"  # axis
    # MI's statements have different subclasses: no single subdiagnostic label
    assert cinc.code_labels("subdiagnostic")["164865005"][0] == "ambiguous"
    labels, report = cinc.map_to_task([["164889003", "426783006"], ["426783006"],
                                       ["426783006", "164865005"]], "superdiagnostic")
    assert labels == [{"NORM"}, {"NORM"}, {"MI"}]  # AF is no diagnosis; MI bars NORM
    assert report["unmapped"] == []


def test_shipped_statements_are_ptbxls() -> None:
    theirs = SHARED / "ptbxl-real-500" / "scp_statements.csv"
    if not theirs.exists():
        pytest.skip("no PTB-XL statements under ../shared/data")
    assert (cinc.TABLES / "scp_statements.csv").read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("task", ptbxl.TASKS)
def test_mapped_labels_agree_with_the_same_records_ptbxl_labels(task) -> None:
    folder = SHARED_CINC if SHARED_CINC.exists() else REAL
    table = cinc.scan_folder(folder)
    sets, report = cinc.map_to_task(list(table["dx"]), task)
    statements = cinc.read_statements()
    exact = 0
    for name, got in zip(table["name"], sets):
        ref = ptbxl.record_labels(dict.fromkeys(PTBXL_CODES[int(name[2:])], 0.0),
                                  statements, task)
        assert got <= ref, (name, got, ref)  # never a label PTB-XL does not give
        exact += got == ref
    if folder == SHARED_CINC:  # measured: what the mapping recovers of PTB-XL's labels
        assert exact == {"all": 6, "form": 9, "rhythm": 10}.get(task, 8)
    # T-wave abnormal stands for NT_ and NDT, which differ in every task but rhythm
    assert [u["code"] for u in report["unmapped"]] == ([] if task == "rhythm" else ["164934002"])


def test_load_real_cinc_folder_with_a_ptbxl_task(tmp_path) -> None:
    data = load_cinc(REAL, task="superdiagnostic", sampling_rate=100, scaler="none",
                     folds={"train": range(1, 11)}, cache_dir=tmp_path, progress=False)
    assert data.task == "superdiagnostic" and data.classes == ["CD", "NORM", "STTC"]
    got = {n: {c for c, y in zip(data.classes, row) if y} for n, row in
           zip(data.record_names, data.labels)}
    assert got == {"HR06001": {"STTC"}, "HR06002": {"CD"}, "HR06003": {"NORM"}}
    assert data.label_report["dropped_without_label"] == 1  # HR06000: NORM + T-wave abnormal
    fixed = load_cinc(REAL, task="superdiagnostic", classes=SUPER, scaler="none",
                      folds={"train": range(1, 11)}, cache_dir=tmp_path, progress=False)
    assert fixed.classes == SUPER and fixed.labels.shape == (3, 5)
    snomed = load_cinc(REAL, scaler="none", folds={"train": range(1, 11)}, cache_dir=tmp_path,
                       progress=False)  # the default keeps the raw codes
    assert snomed.task == "snomed" and snomed.label_report is None
    assert "426783006" in snomed.classes and snomed.fingerprint != data.fingerprint


def _with_dx(tmp_path: Path, dx: dict[str, str]) -> Path:
    folder = tmp_path / "cinc"
    shutil.copytree(REAL, folder)
    for name, codes in dx.items():
        hea = folder / f"{name}.hea"
        lines = [f"# Dx: {codes}" if ln.startswith("# Dx:") else ln
                 for ln in hea.read_text().splitlines()]
        hea.write_text("\n".join(lines) + "\n")
    return folder


def test_unmapped_codes_are_listed(tmp_path) -> None:
    folder = _with_dx(tmp_path, {"HR06000": "426783006,999999999,6374002",
                                 "HR06001": "164889003,6374002"})
    data = load_cinc(folder, task="superdiagnostic", scaler="none",
                     folds={"train": range(1, 11)}, cache_dir=tmp_path / "c", progress=False)
    rows = data.label_report["unmapped"]
    assert rows == [
        {"code": "6374002", "abbreviation": "BBB", "reason": "no PTB-XL statement", "records": 2},
        {"code": "999999999", "abbreviation": "", "reason": "not in the table", "records": 1}]
    # sinus rhythm with an unmapped code is not called NORM; AF alone gives no superclass
    assert data.label_report["dropped_without_label"] == 2
    text = cinc.format_unmapped(data.label_report)
    assert "6374002 (BBB) in 2 record(s): no PTB-XL statement" in text
    # the data stage's table says it too
    from distill.data.tools import describe_data

    described = describe_data(data, folder)
    assert "6374002 (BBB) in 2 record(s): no PTB-XL statement" in described
    assert "2 record(s) without a label of task superdiagnostic left out" in described


def _student(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = students.create("xresnet1d", "tiny", num_labels=len(SUPER),
                            id2label=dict(enumerate(SUPER)))
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    return folder


def test_eval_scores_a_ptbxl_student_on_a_cinc_folder(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ECG_DISTILL_CACHE", str(tmp_path / "cache"))
    folder = _with_dx(tmp_path, {"HR06000": "164865005,426783006"})  # one MI record too
    student = _student(tmp_path)
    out = tmp_path / "r.json"
    assert main(["eval", str(student), "--data", str(folder), "--format", "cinc",
                 "--bootstrap", "20", "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(all, 4 records, task superdiagnostic)" in text
    assert "every SNOMED code mapped" in text
    assert "0 of 4 record(s) have no label among the student's classes" in text
    import json

    result = json.loads(out.read_text())
    assert result["format"] == "cinc" and result["classes"] == SUPER
    assert result["label_report"]["unmapped"] == []
    assert np.isfinite(result["macro_auc"]["value"])


def test_bad_input(tmp_path) -> None:
    from distill.recipe.load import load_recipe
    from distill.run.stages.evaluate import evaluate_checkpoint

    with pytest.raises(DataError, match="unknown task 'snomd' for CinC labels"):
        cinc.map_to_task([["426783006"]], "snomd")
    with pytest.raises(ECGDistillError, match="has no folds.*not split 'test'"):
        evaluate_checkpoint(tmp_path, REAL, fmt="cinc", split="test")
    with pytest.raises(ECGDistillError, match="unknown data format 'wfdb'"):
        evaluate_checkpoint(tmp_path, REAL, fmt="wfdb")
    with pytest.raises(RecipeError, match=r"data\.task: snomed .* needs data\.format: cinc"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", ["data.task=snomed"])
    bad = tmp_path / "map.csv"
    bad.write_text("snomed_code,abbreviation,dx,scp_codes,rule\n1,X,x,AFIB;NOPE,\n")
    with pytest.raises(DataError, match=r"map\.csv: snomed_code 1: NOPE not a PTB-XL statement"):
        cinc.read_mapping(bad)
    bad.write_text("snomed_code,abbreviation,dx,scp_codes\n1,X,x,AFIB\n")
    with pytest.raises(DataError, match=r"map\.csv: missing required column\(s\) rule"):
        cinc.read_mapping(bad)
