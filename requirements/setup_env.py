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
    if choice == "auto":
        if shutil.which("nvidia-smi", path=env.get("PATH")) is None:
            return None
        probe = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                               env=dict(env))
        if probe.returncode != 0 or "GPU" not in probe.stdout:
            return None
        choice = env.get("ECG_DISTILL_CUDA") or DEFAULT_CUDA_TAG
    if choice == "none":
        return None
    if re.fullmatch(r"cpu|cu\d{3}|rocm[\d.]+", choice):
        return PYTORCH_INDEX.format(tag=choice)
    if re.match(r"(https?|file)://", choice):
        return choice
    raise SetupError(f"--torch-index: {choice!r}; expected auto, none, cpu, cuXYZ (e.g. cu128) "
                     f"or an index URL")


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
        base = ["pip", "setuptools"]
    else:
        # newest releases of everything but torch, which stays at the requested build
        # (held by a one-line constraint, so no newest package can pull a CUDA build in)
        pins = read_lock(DEFAULT_LOCK) if DEFAULT_LOCK.exists() else {}
        pip += ["--constraint", _rel(venv / TORCH_CONSTRAINT)]
        base = ["--upgrade", "pip", "setuptools"]
    if torch_spec is None:
        torch_spec = f"torch=={pins['torch']}" if "torch" in pins else FALLBACK_TORCH
    torch_cmd = [*pip, *(["--extra-index-url", index] if index else []), torch_spec]
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
    digest = hashlib.sha256(lock.read_bytes()).hexdigest() if lock else "latest"
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return json.dumps({"lock": digest, "pyproject": pyproject, "torch_index": index}) + "\n"


def install(args: argparse.Namespace) -> int:
    venv = Path(args.venv).resolve() if not Path(args.venv).is_absolute() else Path(args.venv)
    lock = None if args.latest else Path(args.lock).resolve()
    if lock is not None and not lock.is_file():
        raise SetupError(f"{args.lock}: no such lock file; 'make lock' writes it, or pass "
                         f"--latest for the newest releases")
    index = torch_index(args.torch_index)
    steps = plan(venv, lock=lock, torch_spec=args.torch, index=index)
    if args.dry_run:
        for what, cmd in steps:
            print(f"# {what}\n{shlex.join(cmd)}")
        return 0
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
        wrong = off_lock(versions, read_lock(lock))
        if wrong:
            raise SetupError(f"{_rel(venv)} differs from {_rel(lock)}: {'; '.join(wrong)}; "
                             f"'make clean-venv setup' rebuilds it")
        print(f"[setup] every package the lock names is at its locked version "
              f"({sum(1 for n in versions if n in read_lock(lock))} packages)")
    (venv / STAMP).write_text(_stamp_text(lock, index))
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
        raise SetupError(f"{venv}: not a working environment ({out.stderr.strip()[-200:]}); "
                         f"run the install first")
    return {canonical(k): v for k, v in json.loads(out.stdout).items()}


def off_lock(versions: dict[str, str], pins: dict[str, str]) -> list[str]:
    """Installed packages whose version is not the lock's (build labels such as +cpu or
    +cu128 aside). Packages the lock does not name (a CUDA build's nvidia-* libraries) and
    locked ones not installed are not differences."""
    return [f"{name} {have} (locked {pins[name]})" for name, have in sorted(versions.items())
            if name in pins and have.split("+", 1)[0] != pins[name].split("+", 1)[0]]


def lock_text(versions: dict[str, str], *, command: str) -> str:
    """The constraints file of an environment: every package but the project itself, torch
    without its local build label (so the CUDA and CPU builds of that version both match)."""
    lines = [
        "# The tested set: every package of the environment `make lock` built from the newest",
        "# releases and ran the whole test suite in. `make setup` (and so `make quickstart`,",
        "# `make test`, .ci/run) installs against it. Regenerate with `make lock`.",
        f"# Written {datetime.date.today().isoformat()} by `{command}`, Python "
        f"{platform.python_version()} on {platform.machine()}.",
        "# torch is pinned without a local label (+cpu/+cu128): both builds of the version match.",
    ]
    for name in sorted(versions):
        if name == SELF:
            continue
        version = versions[name].split("+", 1)[0] if name == "torch" else versions[name]
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def freeze(args: argparse.Namespace) -> int:
    versions = installed(Path(args.venv))
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(lock_text(versions, command="make lock"))
    os.replace(tmp, out)
    print(f"[lock] {out}: {sum(1 for n in versions if n != SELF)} packages")
    return 0


def drift(versions: dict[str, str], pins: dict[str, str]) -> list[str]:
    """Lines comparing an environment with a lock: key packages first, then every other
    difference (newer, older, added, gone)."""
    def base(v: str) -> str:
        return v.split("+", 1)[0]

    rows = []
    names = [*(p for p in KEY_PACKAGES if p in versions or p in pins),
             *sorted((set(versions) | set(pins)) - set(KEY_PACKAGES) - {SELF})]
    for name in names:
        have, pinned = versions.get(name), pins.get(name)
        if have is not None and pinned is not None and base(have) == base(pinned):
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
    versions = installed(Path(args.venv))
    pins = read_lock(Path(args.against)) if args.against else {}
    print(f"[versions] {args.venv} against {args.against}:")
    print("\n".join(drift(versions, pins)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help="create or update the virtual environment")
    p.add_argument("--venv", default=".venv")
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
