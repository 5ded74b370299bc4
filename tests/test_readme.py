"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples() -> None:
    assert BLOCKS


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code: str, capsys) -> None:
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    # every "# [..]" comment after a print states what it prints
    for line in code.splitlines():
        if line.startswith("print(") and "#" in line:
            for expected in re.findall(r"\[([^\]]*)\]", line.split("#", 1)[1]):
                assert f"[{expected}]" in printed.replace("torch.Size(", "").replace("tensor(", "")\
                    .replace(")", ""), (expected, printed)
