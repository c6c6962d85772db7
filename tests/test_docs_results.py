"""The fenced blocks of docs/results.md run as written, as ``tests/test_docs.py`` runs every other
document's (its docstring says how): a file of their own, so that pytest-xdist, which gives each
file to one worker, runs the two halves (minutes each) side by side."""

import pytest

from tests import test_docs as docs

placeholder_runs = docs.placeholder_runs  # the fixture, made once for this file


@pytest.mark.parametrize("block", list(docs._run_params(results=True)))
def test_block_runs(block, tmp_path, tmp_path_factory, placeholder_runs, monkeypatch):
    docs.run_block(block, tmp_path, tmp_path_factory, placeholder_runs, monkeypatch)
