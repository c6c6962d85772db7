"""The README's code runs as written."""

import re
from pathlib import Path


def test_readme_python_blocks_run():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
    assert set(namespace["c"].alignment_angles()) == {"x->h", "pool->y"}


def test_presets_doc_is_current():
    from neurosim.config import presets_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "presets.md").read_text()
    assert doc == presets_markdown(), "regenerate with: python -m neurosim.config > docs/presets.md"
