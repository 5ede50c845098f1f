"""The runnable examples in docs/ run."""

from __future__ import annotations

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("page,must_use", [("merging.md", ["lora_fx.merge", "aoti_load_package"]),
                                           ("dora.md", ["use_dora=True"]),
                                           ("qlora.md", ["BitsAndBytesConfig", "fullgraph=True", "save_adapter"]),
                                           ("init.md", ['init_lora_weights="pissa"', "lora_fx.transform"]),
                                           ("weighted.md", ["lora_fx.add_weighted_adapter", "output_dir"]),
                                           ("many_adapters.md", ["set_adapter([", "adapter_index="])])
def test_page_example_runs(page, must_use):
    example = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)[0]
    assert all(name in example for name in must_use)
    exec(compile(example, f"docs/{page}", "exec"), {})
