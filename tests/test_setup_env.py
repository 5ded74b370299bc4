"""The set-up: the lock, the install plan, where torch comes from (CPU and CUDA machines).

The CUDA path is checked with pip's own resolver in ``--dry-run`` mode over local stand-in
indexes (no download, no network): the command ``make setup`` runs on a machine where
``nvidia-smi`` answers picks the CUDA index's torch, with the lock in force.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "constraints-cpu.txt"
SCRIPT = ROOT / "requirements" / "setup_env.py"

spec = importlib.util.spec_from_file_location("setup_env", SCRIPT)
setup_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_env)


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------- the lock


def test_the_lock_pins_every_requirement_within_the_projects_ranges() -> None:
    pins = setup_env.read_lock(LOCK)
    project = _pyproject()["project"]
    requirements = [Requirement(r) for r in
                    [*project["dependencies"], *project["optional-dependencies"]["test"]]]
    for req in requirements:
        name = setup_env.canonical(req.name)
        assert name in pins, f"{req.name} is not in the lock"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (req, pins[name])
    for tool in ("pip", "setuptools"):  # the set-up's own tools are locked too
        assert tool in pins
    assert setup_env.SELF not in pins
    # the build backend the lock installs satisfies pyproject's build requirement
    build = [Requirement(r) for r in _pyproject()["build-system"]["requires"]]
    assert all(r.specifier.contains(pins[setup_env.canonical(r.name)]) for r in build)


def test_the_lock_admits_every_build_of_its_torch_version() -> None:
    """No local label: the lock's torch pin matches the CPU build and the CUDA builds, so
    it never forces the CPU build on a GPU machine."""
    torch_pin = setup_env.read_lock(LOCK)["torch"]
    assert "+" not in torch_pin
    spec = SpecifierSet(f"=={torch_pin}")
    for build in ("", "+cpu", "+cu126", "+cu128", "+cu130"):
        assert spec.contains(Version(torch_pin + build))


def test_lock_text_round_trips_and_strips_what_must_not_be_pinned() -> None:
    versions = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "ecg-distill": "0.1.0",
                "pip": "26.3", "setuptools": "84.2.1"}
    text = setup_env.lock_text(versions, command="make lock")
    assert text.splitlines()[0].startswith("#")
    pins = [line for line in text.splitlines() if not line.startswith("#")]
    assert pins == sorted(pins)
    assert setup_env.read_lock_text(text) == {"numpy": "2.4.6", "pip": "26.3",
                                              "setuptools": "84.2.1", "torch": "2.13.0"}


def test_a_malformed_lock_line_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "lock.txt"
    bad.write_text("# header\nnumpy==2.4.6\ntransformers>=5\n")
    with pytest.raises(setup_env.SetupError,
                       match=rf"^{re.escape(str(bad))}:3: expected 'name==version', got "
                             r"'transformers>=5'$"):
        setup_env.read_lock(bad)


def test_the_installed_environment_is_checked_against_the_lock() -> None:
    pins = {"torch": "2.13.0", "numpy": "2.4.6", "pip": "26.3"}
    assert setup_env.off_lock({"torch": "2.13.0+cu128", "numpy": "2.4.6",
                               "nvidia-cublas": "13.0"}, pins) == []
    assert setup_env.off_lock({"torch": "2.13.0+cpu", "numpy": "2.5.0"}, pins) \
        == ["numpy 2.5.0 (locked 2.4.6)"]


def test_the_test_environment_is_the_locked_one() -> None:
    """An environment `make setup` made against the lock (make test, .ci/run) holds the
    lock's versions, of the lock as it is now."""
    import hashlib

    stamp = Path(sys.prefix) / setup_env.STAMP
    if not stamp.is_file():
        pytest.skip(f"{sys.prefix} was not made by make setup")
    made = json.loads(stamp.read_text())
    if made["lock"] == "latest":
        pytest.skip("make test-latest: the newest releases, not the lock, by design")
    assert made["lock"] == hashlib.sha256(LOCK.read_bytes()).hexdigest()
    versions = {setup_env.canonical(d.metadata["Name"]): d.version
                for d in importlib.metadata.distributions()}
    assert setup_env.off_lock(versions, setup_env.read_lock(LOCK)) == []


def test_drift_lists_key_packages_and_every_difference() -> None:
    rows = setup_env.drift({"torch": "2.13.0+cpu", "transformers": "5.30.0", "numpy": "2.4.6",
                            "newpkg": "1.0"},
                           {"torch": "2.13.0", "transformers": "5.24.0", "numpy": "2.4.6",
                            "oldpkg": "0.1"})
    text = "\n".join(rows)
    assert re.search(r"torch\s+2\.13\.0\+cpu\s+\(as locked\)", text)
    assert re.search(r"transformers\s+5\.30\.0\s+\(locked 5\.24\.0\)", text)
    assert re.search(r"newpkg\s+1\.0\s+\(new: not in the lock\)", text)
    assert re.search(r"oldpkg\s+-\s+\(locked 0\.1; not installed now\)", text)
    assert rows[0].split()[0] == "torch"  # key packages first, in their order


# ---------------------------------------------------------------- the install plan


def test_the_plan_installs_torch_alone_first_then_the_project_against_the_lock() -> None:
    steps = setup_env.plan(Path("/v"), lock=LOCK, torch_spec=None, index=None)
    lock = "requirements/constraints-cpu.txt"  # commands run in the checkout
    assert [what.split()[0] for what, _ in steps] == ["virtual", "pip", "torch==" +
                                                      setup_env.read_lock(LOCK)["torch"],
                                                      "ecg-distill"]
    _, torch_cmd = steps[2]
    assert torch_cmd[-1] == f"torch=={setup_env.read_lock(LOCK)['torch']}"
    for _, cmd in steps[1:]:
        assert cmd[:4] == ["/v/bin/python", "-m", "pip", "install"]
        assert cmd[cmd.index("--constraint") + 1] == lock
        assert "--upgrade" not in cmd  # the lock decides every version
    project = steps[3][1]
    assert "--no-build-isolation" in project and project[-1] == ".[test]"


def test_the_latest_plan_holds_torch_and_upgrades_the_rest(tmp_path: Path) -> None:
    steps = setup_env.plan(tmp_path / "v", lock=None, torch_spec="torch==2.13.0", index=None)
    for _, cmd in steps[1:]:
        assert cmd[cmd.index("--constraint") + 1] == str(tmp_path / "v" /
                                                         setup_env.TORCH_CONSTRAINT)
        assert "requirements/constraints-cpu.txt" not in cmd
    assert "--upgrade" in steps[1][1]


def _fake_nvidia_smi(folder: Path, gpus: bool) -> None:
    folder.mkdir()
    exe = folder / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + ("echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
                                    if gpus else "echo 'No devices were found'; exit 6\n"))
    exe.chmod(0o755)


def test_torch_index_follows_the_machine(tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path / "gpu", gpus=True)
    _fake_nvidia_smi(tmp_path / "broken", gpus=False)
    gpu = {"PATH": f"{tmp_path / 'gpu'}:/usr/bin:/bin"}
    assert setup_env.torch_index("auto", gpu) == "https://download.pytorch.org/whl/cu128"
    assert setup_env.torch_index("auto", {**gpu, "ECG_DISTILL_CUDA": "cu130"}) \
        == "https://download.pytorch.org/whl/cu130"
    # no GPU (no tool, or a tool that finds none): the PyTorch CPU index, so a CPU machine
    # anywhere gets the CPU build rather than PyPI's default CUDA one
    cpu = "https://download.pytorch.org/whl/cpu"
    assert setup_env.torch_index("auto", {"PATH": f"{tmp_path / 'broken'}:/usr/bin"}) == cpu
    assert setup_env.torch_index("auto", {"PATH": str(tmp_path / "empty")}) == cpu
    assert setup_env.torch_index("cpu", {}) == cpu
    assert setup_env.torch_index("none", gpu) is None
    assert setup_env.torch_index("file:///srv/idx", {}) == "file:///srv/idx"
    with pytest.raises(setup_env.SetupError, match=r"^--torch-index: 'cuda12'; expected"):
        setup_env.torch_index("cuda12", {})
    with pytest.raises(setup_env.SetupError,
                       match=r"^ECG_DISTILL_CUDA: '12\.8'; expected a CUDA tag such as cu128$"):
        setup_env.torch_index("auto", {**gpu, "ECG_DISTILL_CUDA": "12.8"})


def test_dry_run_on_a_cuda_machine_prints_the_cuda_index_command(tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path / "gpu", gpus=True)
    env = {**os.environ, "PATH": f"{tmp_path / 'gpu'}:{os.environ['PATH']}"}
    env.pop("TORCH_INDEX", None)
    out = subprocess.run([sys.executable, str(SCRIPT), "install", "--dry-run", "--venv",
                          str(tmp_path / "v")], capture_output=True, text=True, env=env,
                         check=True).stdout
    torch_line = next(line for line in out.splitlines() if line.endswith(
        f"torch=={setup_env.read_lock(LOCK)['torch']}"))
    assert "--extra-index-url https://download.pytorch.org/whl/cu128" in torch_line
    assert "--constraint requirements/constraints-cpu.txt" in torch_line
    assert not (tmp_path / "v").exists()  # a dry run creates nothing


def _wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal (empty) wheel, for pip's resolver only."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                                    "true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _simple_index(root: Path, wheels: list[Path]) -> str:
    for name in sorted({w.name.split("-")[0] for w in wheels}):
        page = root / name
        page.mkdir(parents=True)
        links = "".join(f'<a href="{w.as_uri().replace("+", "%2B")}">{w.name}</a>\n'
                        for w in wheels if w.name.split("-")[0] == name)
        (page / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return root.as_uri()


@pytest.mark.parametrize("machine", ["cuda", "cpu"])
def test_pips_resolver_takes_the_machines_torch_build_with_the_lock_in_force(
        tmp_path: Path, machine: str) -> None:
    """The plan's torch and project commands, resolved by pip (--dry-run, nothing
    downloaded) over local stand-ins: PyPI (torch's plain build, a CUDA build on Linux, and
    the lock's filelock, a dependency of torch), the PyTorch CUDA index (+cu128, a newer
    torch, and a filelock of another version, as that index mirrors dependencies at its own
    versions), the PyTorch CPU index (+cpu). Each machine gets its build of the lock's torch
    from its PyTorch index, and torch's dependencies come at the lock's versions from the
    configured indexes, where pip without the lock would take the newest of each."""
    pins = setup_env.read_lock(LOCK)
    version, filelock = pins["torch"], pins["filelock"]
    files = tmp_path / "files"
    needs = ("filelock",)
    pypi = _simple_index(tmp_path / "pypi", [_wheel(files / "pypi", "torch", version, needs),
                                             _wheel(files / "pypi", "filelock", filelock),
                                             _wheel(files / "pypi", "filelock", "99.1.0")])
    cuda = _simple_index(tmp_path / "cuda", [
        _wheel(files / "cuda", "torch", f"{version}+cu128", needs),
        _wheel(files / "cuda", "torch", "99.0+cu128", needs),
        _wheel(files / "cuda", "filelock", "99.0.0")])
    cpu = _simple_index(tmp_path / "cpu", [_wheel(files / "cpu", "torch", f"{version}+cpu", needs)])
    index = cuda if machine == "cuda" else cpu
    steps = setup_env.plan(Path(sys.prefix), lock=LOCK, torch_spec=None, index=index)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=pypi, PIP_NO_CACHE_DIR="1")

    def resolve(cmd: list[str], *extra: str) -> dict[str, dict]:
        report = tmp_path / "report.json"
        cmd = [sys.executable, *cmd[1:4], "--dry-run", "--ignore-installed", "--report",
               str(report), *extra, *cmd[4:]]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                              cwd=ROOT)
        assert done.returncode == 0, done.stdout + done.stderr
        return {item["metadata"]["name"]: item
                for item in json.loads(report.read_text())["install"]}

    torch_step = resolve(steps[2][1])
    assert list(torch_step) == ["torch"]  # the PyTorch index is asked about torch alone
    want = f"{version}+cu128" if machine == "cuda" else f"{version}+cpu"
    assert torch_step["torch"]["metadata"]["version"] == want  # not 99.0: the lock holds it
    assert f"/files/{machine}/" in torch_step["torch"]["download_info"]["url"]
    # the dependencies: the project step (here, torch's requirements as the project's
    # resolution meets them) uses the configured indexes and the lock
    project = steps[3][1]
    assert index not in project
    deps = resolve([*project[:-3], "filelock"])
    assert deps["filelock"]["metadata"]["version"] == filelock  # not 99.x
    assert "/files/pypi/" in deps["filelock"]["download_info"]["url"]


def test_make_setup_and_ci_install_against_the_lock(tmp_path: Path) -> None:
    """`make setup` (which `make test`, `make quickstart` and .ci/run go through) calls the
    set-up with the lock; `make test-latest` builds its own environment without it."""
    def dry(target: str) -> str:
        return subprocess.run(["make", "-n", "-B", target, f"VENV={tmp_path / 'v'}",
                               f"LATEST={tmp_path / 'l'}"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout

    setup = dry("setup")
    assert re.search(r"requirements/setup_env\.py install --venv \S+ --lock "
                     r"requirements/constraints-cpu\.txt --if-needed", setup)
    latest = dry("test-latest")
    assert "install --venv" in latest and "--latest --fresh" in latest
    assert "--lock" not in latest and "pytest" in latest
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_setup_output_is_one_line_per_step_and_a_failure_points_at_the_log(
        tmp_path: Path) -> None:
    """A failing step prints its tail and one error line naming the log; nothing of the
    pip chatter reaches the terminal on success (it goes to <venv>/setup.log)."""
    bad_lock = tmp_path / "lock.txt"
    bad_lock.write_text("pip==0.0.0\nsetuptools==0.0.0\ntorch==0.0.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path))
    venv = tmp_path / "v"
    done = subprocess.run([sys.executable, str(SCRIPT), "install", "--venv", str(venv),
                           "--lock", str(bad_lock), "--torch-index", "none"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stdout.splitlines()[0].startswith("[setup 1/4] virtual environment")
    assert done.stdout.splitlines()[1] == "[setup 2/4] pip and setuptools (locked) ... failed"
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"error: set-up step 'pip and setuptools (locked)' failed (exit 1); the "
                    f"full log is {venv / 'setup.log'}")
    assert "pip==0.0.0" in (venv / "setup.log").read_text()


def test_a_lock_of_another_python_is_refused_in_one_line(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("# Written 2026-11-27 by `make lock`, Python 3.99.1 on x86_64.\n"
                    "pip==26.3\nsetuptools==84.2.1\ntorch==2.13.0\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "install", "--dry-run", "--lock",
                           str(lock), "--torch-index", "none"], capture_output=True, text=True)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"error: {lock} was tested with Python 3.99, this is Python "
                           f"{running}: run the set-up with python3.99 (make PYTHON=python3.99 "
                           f"...), or --latest for the newest releases on this Python\n")
    assert setup_env.lock_python(LOCK.read_text()) == running  # the shipped lock: this Python


def test_if_needed_skips_an_environment_made_from_the_same_inputs(tmp_path: Path,
                                                                  capsys) -> None:
    venv = tmp_path / "v"
    venv.mkdir()
    (venv / setup_env.STAMP).write_text(setup_env._stamp_text(LOCK, None))
    assert setup_env.main(["install", "--venv", str(venv), "--lock", str(LOCK),
                           "--torch-index", "none", "--if-needed"]) == 0
    assert capsys.readouterr().out == "" and sorted(p.name for p in venv.iterdir()) == [
        setup_env.STAMP]  # nothing ran
    # another torch index, lock or set-up makes a different stamp: the install runs again
    other_lock = tmp_path / "lock.txt"
    other_lock.write_text(LOCK.read_text() + "# edited\n")
    stamps = {setup_env._stamp_text(LOCK, None),
              setup_env._stamp_text(LOCK, "https://download.pytorch.org/whl/cu128"),
              setup_env._stamp_text(other_lock, None), setup_env._stamp_text(None, None)}
    assert len(stamps) == 4


def test_relative_paths_are_the_checkouts_and_the_dry_run_says_where(tmp_path: Path) -> None:
    env = {**os.environ, "TORCH_INDEX": "none"}
    out = subprocess.run([sys.executable, str(SCRIPT), "install", "--dry-run"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines()[0] == f"# in {ROOT}"
    assert f"-m venv .venv\n" in out  # the checkout's .venv, whatever the current folder
    latest = subprocess.run([sys.executable, str(SCRIPT), "install", "--dry-run", "--latest"],
                            cwd=tmp_path, capture_output=True, text=True, env=env,
                            check=True).stdout
    assert "-m venv .venv-latest\n" in latest  # never the locked environment


def test_the_lock_is_never_written_from_a_cuda_environment(tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    monkeypatch.setattr(setup_env, "installed",
                        lambda venv: {"torch": "2.13.0+cu128", "nvidia-cublas": "13.0"})
    out = tmp_path / "lock.txt"
    assert setup_env.main(["freeze", "--venv", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path} holds torch 2.13.0+cu128: the lock "
                                       f"is the CPU set's; run 'make lock' on a CPU machine\n")
    assert not out.exists()
