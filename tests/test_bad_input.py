"""Bad input gives one-line DataErrors naming the record and the problem; skip mode drops."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import PTBXL_LEADS, REAL_ECG, true_signal, write_record
from distill.data import SignalView, load_cinc, load_ptbxl, read_record
from distill.core.errors import DataError


def lr(root, eid):
    return root / f"records100/00000/{eid:05d}_lr"


def rewrite(root, eid, signal, leads=PTBXL_LEADS):
    path = lr(root, eid)
    write_record(path.parent, path.name, signal, 100, leads)


def load(root, cache_dir, **kw):
    return load_ptbxl(root, cache_dir=cache_dir, progress=False, **kw)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_signal_file(ptbxl_root, cache_dir):
    lr(ptbxl_root, 4).with_suffix(".dat").unlink()
    match = r"ecg_id 4 \(.*00004_lr\): missing signal file .*00004_lr\.dat"
    with pytest.raises(DataError, match=match) as e:
        load(ptbxl_root, cache_dir)
    one_line(e)


def test_missing_header_file(ptbxl_root, cache_dir):
    lr(ptbxl_root, 2).with_suffix(".hea").unlink()
    with pytest.raises(DataError, match=r"ecg_id 2 .*missing header file .*00002_lr\.hea"):
        load(ptbxl_root, cache_dir)


def test_truncated_dat(ptbxl_root, cache_dir):
    dat = lr(ptbxl_root, 5).with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[:10_000])
    with pytest.raises(DataError, match=r"ecg_id 5 .*truncated signal file .*00005_lr\.dat "
                                        r"\(10000 bytes, header needs 24000\)"):
        load(ptbxl_root, cache_dir)


def test_corrupt_header(ptbxl_root, cache_dir):
    lr(ptbxl_root, 3).with_suffix(".hea").write_text("this is not a header\n")
    with pytest.raises(DataError, match=r"ecg_id 3 .*corrupt header .*00003_lr\.hea") as e:
        load(ptbxl_root, cache_dir)
    one_line(e)


def test_nan_in_signal(ptbxl_root, cache_dir):
    sig = true_signal(6, 100)
    sig[7, 300:310] = np.nan
    rewrite(ptbxl_root, 6, sig)
    with pytest.raises(DataError, match=r"ecg_id 6 .*: 10 NaN/inf sample\(s\), first in lead V2"):
        load(ptbxl_root, cache_dir)


def test_flat_lead(ptbxl_root, cache_dir):
    sig = true_signal(1, 100)
    sig[8] = 0.2
    rewrite(ptbxl_root, 1, sig)
    with pytest.raises(DataError, match=r"ecg_id 1 .*: flat lead\(s\) V3"):
        load(ptbxl_root, cache_dir)


def test_missing_lead(ptbxl_root, cache_dir):
    keep = [i for i in range(12) if i != 9]
    rewrite(ptbxl_root, 2, true_signal(2, 100)[keep], tuple(PTBXL_LEADS[i] for i in keep))
    with pytest.raises(DataError, match=r"ecg_id 2 .*: missing lead\(s\) V4"):
        load(ptbxl_root, cache_dir)


def test_read_record_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nowhere/x: missing header file"):
        read_record(tmp_path / "nowhere" / "x")


def test_database_missing_columns(ptbxl_root, cache_dir):
    csv = ptbxl_root / "ptbxl_database.csv"
    pd.read_csv(csv).drop(columns=["scp_codes", "strat_fold"]).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"ptbxl_database\.csv: missing required column\(s\) "
                                        r"scp_codes, strat_fold"):
        load(ptbxl_root, cache_dir)


def test_database_missing_filename_column_for_rate(ptbxl_root, cache_dir):
    csv = ptbxl_root / "ptbxl_database.csv"
    pd.read_csv(csv).drop(columns=["filename_hr"]).to_csv(csv, index=False)
    match = r"ptbxl_database\.csv: missing required column\(s\) filename_hr"
    with pytest.raises(DataError, match=match):
        load(ptbxl_root, cache_dir, sampling_rate=500)


def test_statements_missing_columns(ptbxl_root, cache_dir):
    csv = ptbxl_root / "scp_statements.csv"
    pd.read_csv(csv, index_col=0).drop(columns=["diagnostic_class", "rhythm"]).to_csv(csv)
    with pytest.raises(DataError, match=r"scp_statements\.csv: missing required column\(s\) "
                                        r"rhythm, diagnostic_class"):
        load(ptbxl_root, cache_dir)


def test_missing_csv_and_bad_scp_codes(ptbxl_root, cache_dir):
    csv = ptbxl_root / "ptbxl_database.csv"
    db = pd.read_csv(csv)
    db.loc[db.ecg_id == 7, "scp_codes"] = "{'SR': 0.0"
    db.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"ptbxl_database\.csv: ecg_id 7: scp_codes .* not a dict"):
        load(ptbxl_root, cache_dir)
    csv.unlink()
    with pytest.raises(DataError, match=r"missing file .*ptbxl_database\.csv"):
        load(ptbxl_root, cache_dir)


def test_missing_records100_folder(ptbxl_root, cache_dir):
    shutil.rmtree(ptbxl_root / "records100")
    with pytest.raises(DataError, match=r"no records100/ folder, needed for sampling_rate=100"):
        load(ptbxl_root, cache_dir)
    assert load(ptbxl_root, cache_dir, sampling_rate=500).signals.shape[-1] == 5000


def test_bad_settings(ptbxl_root, cache_dir):
    with pytest.raises(DataError, match="unknown task 'diag'"):
        load(ptbxl_root, cache_dir, task="diag")
    with pytest.raises(DataError, match="unknown scaler 'minmax'"):
        load(ptbxl_root, cache_dir, scaler="minmax")
    with pytest.raises(DataError, match="on_bad_record must be one of error, skip"):
        load(ptbxl_root, cache_dir, on_bad_record="ignore")
    with pytest.raises(DataError, match="unknown lead name 'V7'"):
        load(ptbxl_root, cache_dir).split("train", {"x": SignalView(("V7",))})


def test_skip_mode_warns_and_drops_everywhere(ptbxl_root, cache_dir):
    lr(ptbxl_root, 3).with_suffix(".dat").unlink()          # train record (fold 3)
    sig = true_signal(9, 100)
    sig[0, 5] = np.nan
    rewrite(ptbxl_root, 9, sig)                              # the only val record
    with pytest.warns(UserWarning, match=r"skipped 2 bad record\(s\) of 10; first: ecg_id 3"):
        data = load(ptbxl_root, cache_dir, on_bad_record="skip")
    assert data.ecg_ids.tolist() == [1, 2, 4, 5, 6, 10]
    assert data.strat_fold.tolist() == [1, 2, 4, 5, 8, 10]
    assert {k: v.tolist() for k, v in data.splits.items()} == {
        "train": [0, 1, 2, 3, 4], "val": [], "test": [5]}
    np.testing.assert_array_equal(data.labels, [[0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1],
                                                [1, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 1, 0, 0, 0]])
    train = np.stack([data.signal(i) for i in range(5)]).astype(np.float64)
    np.testing.assert_allclose(data.scaler.mean[0], train.mean(), rtol=1e-9)
    assert data.signals.shape == (6, 12, 1000)
    # The cached store remembers the bad records: same drop, same warning, and the
    # strict mode still refuses the folder.
    with pytest.warns(UserWarning, match=r"skipped 2 bad record\(s\)"):
        again = load(ptbxl_root, cache_dir, on_bad_record="skip")
    assert again.ecg_ids.tolist() == data.ecg_ids.tolist()
    with pytest.raises(DataError, match=r"ecg_id 3 .*missing signal file"):
        load(ptbxl_root, cache_dir)


def test_cinc_truncated_mat_and_skip(tmp_path, cache_dir):
    folder = tmp_path / "cinc"
    shutil.copytree(REAL_ECG / "cinc2021-ptbxl-500hz", folder)
    mat = folder / "HR06001.mat"
    mat.chmod(0o644)
    mat.write_bytes(mat.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"record HR06001 \(.*HR06001\): truncated signal file"):
        load_cinc(folder, cache_dir=cache_dir, progress=False)
    with pytest.warns(UserWarning, match=r"skipped 1 bad record\(s\) of 4"):
        data = load_cinc(folder, cache_dir=cache_dir, progress=False, on_bad_record="skip",
                         folds={"train": range(1, 11)})
    assert data.record_names == ["HR06000", "HR06002", "HR06003"]
    assert "55930002" not in data.classes  # only HR06001 carried it


def test_cinc_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"CinC folder .*nope does not exist"):
        load_cinc(tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no \.hea record headers found"):
        load_cinc(tmp_path / "empty", progress=False)


def test_empty_filename_for_rate(ptbxl_root, cache_dir):
    csv = ptbxl_root / "ptbxl_database.csv"
    db = pd.read_csv(csv)
    db["filename_hr"] = ""
    db.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"ecg_id 1: empty filename_hr \(10 record\(s\)\)"):
        load(ptbxl_root, cache_dir, sampling_rate=500)


def test_header_rate_that_contradicts_its_folder_is_refused(ptbxl_root, cache_dir):
    """A records100 header that claims 250 Hz is not silently resampled and zero-padded."""
    path = lr(ptbxl_root, 3)
    write_record(path.parent, path.name, true_signal(3, 100), 250)
    with pytest.raises(DataError) as err:
        load(ptbxl_root, cache_dir)
    assert one_line(err).endswith("00003_lr): header says 250 Hz, but its folder holds 100 Hz "
                                  "records")


def test_short_ptbxl_record_is_refused_not_padded(ptbxl_root, cache_dir):
    rewrite(ptbxl_root, 4, true_signal(4, 100, seconds=6.0))
    with pytest.raises(DataError) as err:
        load(ptbxl_root, cache_dir)
    assert one_line(err).endswith("00004_lr): 6.00 s long, expected 10.00 s")
    with pytest.warns(UserWarning, match=r"skipped 1 bad record\(s\) of 10"):
        data = load(ptbxl_root, cache_dir, on_bad_record="skip")
    assert 4 not in data.ecg_ids


def test_unusable_cache_folder_is_one_line(ptbxl_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"cache folder .*file/sub: cannot create it"):
        load_ptbxl(ptbxl_root, cache_dir=blocker / "sub", progress=False)
