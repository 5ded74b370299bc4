"""Set up ecg-distill's virtual environment, against the lock or from the newest releases.

Standard library only, so the system ``python3`` runs it before any environment exists.
The Makefile calls it (``make setup``, ``make test-latest``, ``make lock``); each pip call's
output goes to ``<venv>/setup.log`` and the terminal shows one line per step (the log's
tail is printed when a step fails).

Commands::

    python3 requirements/setup_env.py install [--venv .venv] [--lock FILE | --latest]
                                              [--torch-index auto|cpu|cu128|URL] [--dry-run]
    python3 requirements/setup_env.py freeze --venv .venv-latest --out requirements/constraints-cpu.txt
    python3 requirements/setup_env.py versions --venv .venv-latest [--against FILE]

``install`` with the lock (the default) makes every package the exact version the lock
names, so two fresh machines get the same environment. torch is installed first, on its
own, so that pip never resolves it as a dependency of another package: on a CPU machine a
bare ``torch`` pulls a multi-GB CUDA build. Where torch comes from:

- ``--torch-index auto`` (the default): a machine where ``nvidia-smi`` answers takes the
  PyTorch CUDA index (``cu128``, or ``$ECG_DISTILL_CUDA``), any other machine the
  configured indexes (on this project's CPU machines the local CPU build of the lock's
  version; elsewhere pass ``cpu``);
- ``cpu`` / ``cuXYZ``: the PyTorch CPU / CUDA index of that tag;
- a URL: that index.

A PyTorch index is added as an *extra* index: the lock still applies, and its
``torch==X.Y.Z`` (no local label) admits ``X.Y.Z+cu128`` and ``X.Y.Z+cpu`` alike, while pip
prefers the build with the local label over PyPI's plain one. So the lock never forces the
CPU build on a GPU machine, nor the reverse.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOCK = ROOT / "requirements" / "constraints-cpu.txt"
PYTORCH_INDEX = "https://download.pytorch.org/whl/{tag}"
DEFAULT_CUDA_TAG = "cu128"
# The CPU build this project's machines hold on disk; used only while no lock exists.
FALLBACK_TORCH = "torch==2.13.0"
EXTRAS = "test"
STAMP = ".ecg-distill-installed"
TORCH_CONSTRAINT = "torch-constraint.txt"  # in the venv, with --latest
# The project itself is never locked (it is installed from the checkout).
SELF = "ecg-distill"
# Versions the drift report always shows, in this order (the rest follow alphabetically).
KEY_PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "pot",
                "huggingface-hub", "safetensors", "tokenizers", "numpy", "scipy",
                "scikit-learn", "pandas", "wfdb", "matplotlib", "pytest")


class SetupError(RuntimeError):
    """A set-up step failed; the message is one line for the user."""


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> str:
    """A version without its local build label: ``2.13.0+cpu`` -> ``2.13.0``."""
    return version.split("+", 1)[0]


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a constraints file of ``name==version`` lines."""
    return read_lock_text(Path(path).read_text(), source=str(path))


def read_lock_text(text: str, source: str = "<lock>") -> dict[str, str]:
    """:func:`read_lock` of the file's text; errors name ``source`` and the line."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if m is None:
            raise SetupError(f"{source}:{n}: expected 'name==version', got {raw.strip()!r}")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def torch_index(choice: str, env: dict[str, str] | None = None) -> str | None:
    """The extra index torch is installed from, or None for the configured indexes."""
    env = os.environ if env is None else env
    given = "--torch-index"
    if choice == "auto":
        if has_gpu(env):
            choice, given = env.get("ECG_DISTILL_CUDA") or DEFAULT_CUDA_TAG, "ECG_DISTILL_CUDA"
        else:
            choice = "cpu"
    if choice == "none":
        return None
    if re.fullmatch(r"cpu|cu\d{3}|rocm[\d.]+", choice):
        return PYTORCH_INDEX.format(tag=choice)
    if re.match(r"(https?|file)://", choice):
        return choice
    raise SetupError(f"{given}: {choice!r}; expected "
                     + ("a CUDA tag such as cu128" if given == "ECG_DISTILL_CUDA" else
                        "auto, none, cpu, cuXYZ (e.g. cu128) or an index URL"))


def has_gpu(env: dict[str, str]) -> bool:
    """Whether ``nvidia-smi`` answers with at least one GPU (a broken driver, a hang or a
    missing tool count as no GPU)."""
    exe = shutil.which("nvidia-smi", path=env.get("PATH"))
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, "-L"], capture_output=True, text=True, env=dict(env),
                               timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and "GPU" in probe.stdout


def plan(venv: Path, *, lock: Path | None, torch_spec: str | None, index: str | None,
         extras: str = EXTRAS) -> list[tuple[str, list[str]]]:
    """The install steps: (what the terminal shows, the command).

    Args:
        venv: the virtual environment's folder (created by the first step).
        lock: the constraints file, or None for the newest releases.
        torch_spec: the torch requirement; default: the lock's version, or with no lock
            the version of the shipped lock (the newest CPU build these machines hold).
        index: an extra index for torch (a PyTorch CPU/CUDA index), or None.
    """
    py = _rel(venv / "bin" / "python")  # paths relative to the checkout, where pip runs
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    if lock is not None:
        pins = read_lock(lock)
        pip += ["--constraint", _rel(lock)]
        missing = [p for p in ("pip", "setuptools", "torch") if p not in pins]
        if missing:
            raise SetupError(f"{lock}: no pin for {', '.join(missing)}; regenerate it with "
                             f"'make lock'")
        base = ["pip", "setuptools"]
    else:
        # newest releases of everything but torch, which stays at the requested build
        # (held by a one-line constraint, so no newest package can pull a CUDA build in)
        pins = read_lock(DEFAULT_LOCK) if DEFAULT_LOCK.exists() else {}
        pip += ["--constraint", _rel(venv / TORCH_CONSTRAINT)]
        base = ["--upgrade", "pip", "setuptools"]
    if torch_spec is None:
        torch_spec = f"torch=={pins['torch']}" if "torch" in pins else FALLBACK_TORCH
    # torch alone from the PyTorch index (--no-deps: its dependencies come with the
    # project's, from the configured indexes, so an unreachable or mirroring PyTorch index
    # is asked about torch only)
    torch_cmd = [*pip, *(["--extra-index-url", index, "--no-deps"] if index else []),
                 torch_spec]
    where = ("the configured indexes" if index is None else index)
    return [
        (f"virtual environment {_rel(venv)}", [sys.executable, "-m", "venv", _rel(venv)]),
        ("pip and setuptools" + (" (locked)" if lock else " (newest)"), [*pip, *base]),
        (f"{torch_spec} from {where}", torch_cmd),
        # the project's own build uses the venv's setuptools (locked), not a fresh download
        (f"ecg-distill and its dependencies[{extras}]"
         + (f" against {_rel(lock)}" if lock else " (newest releases)"),
         [*pip, "--no-build-isolation", "--editable", f".[{extras}]"]),
    ]


def _rel(path: Path) -> str:
    try:  # abspath, not resolve: a venv's python is a symlink that must stay one
        return str(Path(os.path.abspath(path)).relative_to(ROOT))
    except ValueError:
        return str(path)


def _stamp_text(lock: Path | None, index: str | None) -> str:
    """What an environment was made from: the lock, pyproject.toml and this script (by
    content) and the torch index; ``install --if-needed`` reinstalls when any differs."""
    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    return json.dumps({"lock": digest(lock) if lock else "latest",
                       "pyproject": digest(ROOT / "pyproject.toml"),
                       "setup": digest(Path(__file__)), "torch_index": index}) + "\n"


def _in_checkout(path: str) -> Path:
    """A path as given, relative ones against the checkout (where pip runs), not the
    current directory."""
    return Path(path) if Path(path).is_absolute() else ROOT / path


def lock_python(text: str) -> str | None:
    """The Python ``major.minor`` a lock's header says it was written with."""
    m = re.search(r"Python (\d+\.\d+)", text)
    return m.group(1) if m else None


def install(args: argparse.Namespace) -> int:
    venv = _in_checkout(args.venv or (".venv-latest" if args.latest else ".venv"))
    lock = None if args.latest else _in_checkout(args.lock)
    if lock is not None and not lock.is_file():
        raise SetupError(f"{args.lock}: no such lock file; 'make lock' writes it, or pass "
                         f"--latest for the newest releases")
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    wanted = lock_python(lock.read_text()) if lock is not None else None
    if wanted is not None and wanted != running:
        raise SetupError(f"{_rel(lock)} was tested with Python {wanted}, this is Python "
                         f"{running}: run the set-up with python{wanted} "
                         f"(make PYTHON=python{wanted} ...), or --latest for the newest "
                         f"releases on this Python")
    index = torch_index(args.torch_index)
    steps = plan(venv, lock=lock, torch_spec=args.torch, index=index)
    if args.dry_run:
        print(f"# in {ROOT}")
        for what, cmd in steps:
            print(f"# {what}\n{shlex.join(cmd)}")
        return 0
    stamp = venv / STAMP
    if args.if_needed and not args.fresh and stamp.is_file() \
            and stamp.read_text() == _stamp_text(lock, index):
        return 0  # made from this lock, pyproject.toml, set-up and torch index already
    if args.fresh and venv.exists():
        shutil.rmtree(venv)
    venv.mkdir(parents=True, exist_ok=True)
    if lock is None:
        torch_spec = steps[2][1][-1]
        (venv / TORCH_CONSTRAINT).write_text(torch_spec + "\n")
    log = venv / "setup.log"
    started = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n=== {datetime.datetime.now().isoformat(timespec='seconds')} "
                  f"{shlex.join(sys.argv)}\n")
        for k, (what, cmd) in enumerate(steps, 1):
            print(f"[setup {k}/{len(steps)}] {what} ...", end="", flush=True)
            t0 = time.monotonic()
            out.write(f"\n$ {shlex.join(cmd)}\n")
            out.flush()
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            if done.returncode != 0:
                print(" failed")
                out.flush()
                tail = log.read_text().splitlines()[-25:]
                print("\n".join(tail), file=sys.stderr)
                raise SetupError(f"set-up step '{what}' failed (exit {done.returncode}); "
                                 f"the full log is {_rel(log)}")
            print(f" {time.monotonic() - t0:.0f} s", flush=True)
    versions = installed(venv)
    if lock is not None:
        pins = read_lock(lock)
        wrong = off_lock(versions, pins)
        if wrong:
            raise SetupError(f"{_rel(venv)} differs from {_rel(lock)}: {'; '.join(wrong)}; "
                             f"'make clean-venv setup' rebuilds it")
        print(f"[setup] every package the lock names is at its locked version "
              f"({sum(1 for n in versions if n in pins)} packages)")
    label = versions.get("torch", "").partition("+")[2]
    tag = (index or "").rstrip("/").rsplit("/", 1)[-1]
    if index and index.startswith(PYTORCH_INDEX.format(tag="")) and label != tag:
        print(f"[setup] warning: torch {versions.get('torch')} is not the {tag} build the "
              f"index was asked for (does {index} hold torch {versions.get('torch', '?')}?)")
    stamp.write_text(_stamp_text(lock, index))
    shown = ", ".join(f"{p} {versions[p]}" for p in KEY_PACKAGES[:6] if p in versions)
    print(f"[setup] ready in {time.monotonic() - started:.0f} s: {shown}")
    return 0


def installed(venv: Path) -> dict[str, str]:
    """``{canonical name: version}`` of every distribution in the environment."""
    code = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: "
            "d.version for d in m.distributions() if d.metadata['Name']}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                         text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SetupError(f"{venv}: not a working environment ({last}); run the install first")
    return {canonical(k): v for k, v in json.loads(out.stdout).items()}


def off_lock(versions: dict[str, str], pins: dict[str, str]) -> list[str]:
    """Installed packages whose version is not the lock's (build labels such as +cpu or
    +cu128 aside). Packages the lock does not name (a CUDA build's nvidia-* libraries) and
    locked ones not installed are not differences."""
    return [f"{name} {have} (locked {pins[name]})" for name, have in sorted(versions.items())
            if name in pins and release(have) != release(pins[name])]


def lock_text(versions: dict[str, str], *, command: str, python: str | None = None) -> str:
    """The constraints file of an environment: every package but the project itself, torch
    without its local build label (so the CUDA and CPU builds of that version both match)."""
    lines = [
        "# The tested set: every package of the environment `make lock` built from the newest",
        "# releases and ran the whole test suite in. `make setup` (and so `make quickstart`,",
        "# `make test`, .ci/run) installs against it. Regenerate with `make lock`.",
        f"# Written {datetime.date.today().isoformat()} by `{command}`, Python "
        f"{python or platform.python_version()} on {platform.machine()}; the set-up refuses "
        f"another Python minor version.",
        "# torch is pinned without a local label (+cpu/+cu128): both builds of the version match.",
    ]
    for name in sorted(versions):
        if name == SELF:
            continue
        version = release(versions[name]) if name == "torch" else versions[name]
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def freeze(args: argparse.Namespace) -> int:
    versions = installed(_in_checkout(args.venv))
    if "+" in versions.get("torch", "") and not versions["torch"].endswith("+cpu"):
        raise SetupError(f"{args.venv} holds torch {versions['torch']}: the lock is the CPU "
                         f"set's; run 'make lock' on a CPU machine")
    out = _in_checkout(args.out)
    python = subprocess.run([str(_in_checkout(args.venv) / "bin" / "python"), "-c",
                             "import platform; print(platform.python_version())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(lock_text(versions, command="make lock", python=python))
    os.replace(tmp, out)
    print(f"[lock] {out}: {sum(1 for n in versions if n != SELF)} packages")
    return 0


def drift(versions: dict[str, str], pins: dict[str, str]) -> list[str]:
    """Lines comparing an environment with a lock: key packages first, then every other
    difference (newer, older, added, gone)."""
    rows = []
    names = [*(p for p in KEY_PACKAGES if p in versions or p in pins),
             *sorted((set(versions) | set(pins)) - set(KEY_PACKAGES) - {SELF})]
    for name in names:
        have, pinned = versions.get(name), pins.get(name)
        if have is not None and pinned is not None and release(have) == release(pinned):
            if name in KEY_PACKAGES:
                rows.append(f"  {name:<18} {have:<14} (as locked)")
        elif have is None:
            rows.append(f"  {name:<18} {'-':<14} (locked {pinned}; not installed now)")
        elif pinned is None:
            rows.append(f"  {name:<18} {have:<14} (new: not in the lock)")
        else:
            rows.append(f"  {name:<18} {have:<14} (locked {pinned})")
    return rows


def versions_cmd(args: argparse.Namespace) -> int:
    versions = installed(_in_checkout(args.venv))
    pins = read_lock(_in_checkout(args.against)) if args.against else {}
    print(f"[versions] {args.venv} against {args.against}:")
    print("\n".join(drift(versions, pins)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="create or update the virtual environment")
    p.add_argument("--venv", default=None,
                   help="the environment (default .venv, or .venv-latest with --latest)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--lock", default=str(DEFAULT_LOCK),
                       help="constraints file every package is installed against")
    group.add_argument("--latest", action="store_true",
                       help="no lock: the newest releases (torch stays at the lock's version "
                            "unless --torch says otherwise)")
    p.add_argument("--torch", default=None, help="torch requirement (default: the lock's)")
    p.add_argument("--torch-index", default=os.environ.get("TORCH_INDEX") or "auto",
                   help="auto, none, cpu, cuXYZ or an index URL (default: auto)")
    p.add_argument("--fresh", action="store_true", help="delete the environment first")
    p.add_argument("--if-needed", action="store_true",
                   help="do nothing when the environment was made from this lock, "
                        "pyproject.toml, set-up script and torch index")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(run=install)
    f = sub.add_parser("freeze", help="write an environment's versions as the lock")
    f.add_argument("--venv", required=True)
    f.add_argument("--out", default=str(DEFAULT_LOCK))
    f.set_defaults(run=freeze)
    v = sub.add_parser("versions", help="an environment's versions against a lock")
    v.add_argument("--venv", required=True)
    v.add_argument("--against", default=str(DEFAULT_LOCK))
    v.set_defaults(run=versions_cmd)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
