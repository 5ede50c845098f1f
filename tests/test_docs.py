"""The runnable examples in docs/ run."""

from __future__ import annotations

import pathlib
import re

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def test_merging_page_example_runs():
    text = (DOCS / "merging.md").read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert "lora_fx.merge" in example and "aoti_load_package" in example
    exec(compile(example, "docs/merging.md", "exec"), {})
