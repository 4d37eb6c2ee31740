"""Claim: the README's library example runs as written."""
from __future__ import annotations

import re
from pathlib import Path


def test_readme_library_example_runs(capsys) -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'w_rel_err': 0.0" in out and "'lr_rel_err': 0.0" in out
