"""``metrics.jsonl`` is strict JSON: undefined values are ``null``, and files with ``NaN`` still load."""

import json
import math

import pytest

from neurosim.tools.figures import plot_run, read_metrics
from neurosim.training.config import preset
from neurosim.training.run_dir import open_run, resume_run
from neurosim.training.run_log import metrics_records


def _strict(line: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def dfa_run(tmp_path_factory):
    """A short DFA run: its synapses have no feedback matrix, so every W–Bᵀ angle is undefined."""
    run_dir = tmp_path_factory.mktemp("dfa") / "run"
    cfg = preset("dfa_mlp_digits", epochs=2, train_limit=256, monitor_every=0, device="cpu")
    open_run(run_dir, cfg, quiet=True).train()
    return run_dir


def test_a_dfa_runs_metrics_are_strict_json_with_null_angles(dfa_run):
    lines = (dfa_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # epoch 0 (before training), 1, 2
    for line in lines:
        record = _strict(line)
        assert record["mean_angle"] is None and record["angles"] and set(record["angles"].values()) == {None}
        assert math.isfinite(record["test_acc"]) and math.isfinite(record["test_loss"])
    assert [r["angles"] for r in metrics_records(dfa_run / "metrics.jsonl")] == [_strict(x)["angles"] for x in lines]
    # Readers that draw or average see NaN, and leave it out.
    assert all(math.isnan(a) for r in read_metrics(dfa_run) for a in r["angles"].values())
    assert {p.name for p in plot_run(dfa_run)} >= {"accuracy.png"}


def test_a_file_written_with_nan_still_loads(dfa_run, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((dfa_run / "config.json").read_text())
    text = (dfa_run / "metrics.jsonl").read_text()
    (old / "metrics.jsonl").write_text(text.replace("null", "NaN"))
    assert "NaN" in (old / "metrics.jsonl").read_text()
    assert metrics_records(old / "metrics.jsonl") == metrics_records(dfa_run / "metrics.jsonl")
    assert all(math.isnan(r["mean_angle"]) for r in read_metrics(old))
    assert {p.name for p in plot_run(old)} >= {"accuracy.png"}


def test_a_resumed_run_rewrites_an_old_file_as_strict_json(dfa_run, tmp_path):
    """A resume rewrites ``metrics.jsonl`` to the epochs its checkpoint holds: NaN becomes null."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(dfa_run, run_dir)
    text = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(text.replace("null", "NaN"))
    cfg = preset("dfa_mlp_digits", epochs=3, train_limit=256, monitor_every=0, device="cpu")
    resume_run(run_dir, expect=cfg, overrides={"epochs": 3}, quiet=True).train()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(_strict(line)["mean_angle"] is None for line in lines)


def test_finite_values_are_written_as_they_are(tmp_path):
    from neurosim.training.run_log import RunLog

    m = {"epoch": 1, "test_acc": 50.0, "angles": {"a": 1.5, "b": math.nan}, "mean_angle": 1.5,
         "train_loss": math.inf}
    RunLog(tmp_path, quiet=True).metrics(tmp_path / "metrics.jsonl", m)
    line = (tmp_path / "metrics.jsonl").read_text()
    assert _strict(line) == {"epoch": 1, "test_acc": 50.0, "angles": {"a": 1.5, "b": None}, "mean_angle": 1.5,
                             "train_loss": None}
    assert m["angles"]["b"] != m["angles"]["b"]  # the caller's record is left as it was
