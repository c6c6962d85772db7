"""Nothing lost, nothing silent, second round: a lost ``last.pt``, a run directory moved or
deleted while training, statistics of an interrupted epoch under torchrun, the RNG state of
streamed runs, damaged ``metrics.jsonl`` and ``config.json``, a lock that was never taken, a
full disk under the metrics file and figures of a read-only run.

docs/reliability.md lists what each test stands for.
"""

import gc
import json
import pathlib
import shutil
import sys

import pytest

from neurosim.config import preset
from neurosim.errors import UserError
from neurosim.files import DirectoryLock
from neurosim.train import open_run

TIMING = ("time_s", "images_per_s")


def records(path: pathlib.Path) -> list[dict]:
    """The lines of a metrics file, timings aside."""
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


def copy_run(run: pathlib.Path, where: pathlib.Path) -> pathlib.Path:
    shutil.copytree(run, where, ignore=shutil.ignore_patterns(".lock"))
    return where


CFG = preset("kp_mlp_digits", epochs=3, device="cpu", monitor_every=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A three-epoch digits run with a monitor (copied by each test that damages it)."""
    root = tmp_path_factory.mktemp("trained")
    run = open_run(root / "run", CFG, quiet=True)
    run.train()
    return root / "run"


# -- 11. a lock that was never taken ---------------------------------------------------------------

def test_a_lock_that_could_not_be_taken_leaves_nothing_for_its_finaliser(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(sys, "unraisablehook", said.append)
    with pytest.raises(UserError, match="cannot use run directory"):
        DirectoryLock(tmp_path / "missing")
    gc.collect()
    assert said == []
