"""A run stopped mid-epoch and resumed ends exactly where an uninterrupted run ends."""

import copy
import json

import pytest
import torch

from neurosim.common.errors import UserError
from neurosim.training.checkpoint import load_checkpoint
from neurosim.training.config import preset
from neurosim.training.run import RunInterrupted
from neurosim.training.run_dir import open_run, resume_run


def _stop_at(step):
    def hook(run):
        if run.step == step:
            run.stop_requested = True
    return hook


@pytest.mark.parametrize("name, overrides", [
    ("wm_mlp_digits", dict(epochs=2)),  # sleep noise generator and a pre-training sleep
    pytest.param("kp_resnet18", dict(epochs=2, width=0.0625, data="synthetic", synthetic_train=96, synthetic_test=32,
                                     batch_size=16, milestones=(1,)),  # momentum, BN, augmentation, schedule
                 marks=pytest.mark.slow),
])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, name, overrides):
    cfg = preset(name, device="cpu", **overrides)
    whole = open_run(tmp_path / "whole", cfg, quiet=True)
    whole.train()

    part = open_run(tmp_path / "part", cfg, quiet=True)
    stop = len(part.train_stream) + 3  # three batches into the second epoch
    with pytest.raises(RunInterrupted, match="--resume"):
        part.train(on_step=_stop_at(stop))
    saved = load_checkpoint(tmp_path / "part" / "last.pt")
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 3, stop)

    resumed = resume_run(tmp_path / "part", quiet=True)
    resumed.train()
    a, b = whole.circuit.state_dict(), resumed.circuit.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in ("time_s", "images_per_s")}
                           for x in lines]
    assert strip(ma) == strip(mb)


def test_resume_refuses_another_rule_or_model(tmp_path):
    run = open_run(tmp_path / "r", preset("kp_mlp_digits", epochs=1), quiet=True)
    run.train()
    with pytest.raises(UserError, match="holds a kp_mlp_digits run, not bp_mlp_digits"):
        resume_run(tmp_path / "r", expect=preset("bp_mlp_digits"))
    with pytest.raises(UserError, match="holds a kp_mlp_digits run, not kp_mlp_original"):
        resume_run(tmp_path / "r", expect=preset("kp_mlp_original"))  # same rule and model kind
    with pytest.raises(UserError, match="cannot change when resuming"):
        resume_run(tmp_path / "r", expect=preset("kp_mlp_digits"), overrides={"lr": 0.5})
    more = resume_run(tmp_path / "r", expect=preset("kp_mlp_digits"), overrides={"epochs": 2}, quiet=True)
    assert more.epoch == 1
    more.train()
    assert more.epoch == 2


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run = open_run(tmp_path / "r", preset("bp_mlp_digits", epochs=1), quiet=True)
    run.train()
    path = tmp_path / "r" / "last.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="is damaged or not a checkpoint"):
        resume_run(tmp_path / "r")


def test_a_restored_run_watches_divergence_from_its_own_first_step(tmp_path):
    """Steps taken before a restore (a warm-up that compiles the graphs) leave no loss behind
    for the divergence watch: its reference is the restored run's own first step."""
    cfg = preset("kp_mlp_digits", epochs=1, train_limit=64, batch_size=16, device="cpu")
    fresh = open_run(tmp_path / "fresh", cfg, quiet=True)
    warmed = open_run(tmp_path / "warmed", cfg, quiet=True)
    start = copy.deepcopy(warmed.state_dict())
    batches = list(warmed.train_stream.epoch(0))
    for x, y in batches[:2]:  # the first step sets the reference; the second waits in the ring
        warmed.engaged_step(x, y)
    warmed.load_state_dict(start)
    assert warmed.first_loss is None
    x, y = batches[0]
    warmed.engaged_step(x, y)
    fresh.engaged_step(x, y)
    assert warmed.first_loss == fresh.first_loss


def test_a_resume_at_an_epochs_last_step_gives_no_scheduler_warning(tmp_path, recwarn):
    """Stopped after an epoch's last step, a resume ends that epoch at once: the learning-rate
    schedule steps before this process's optimizer has, which PyTorch would warn about though the
    optimizer's steps were taken (before the checkpoint)."""
    from neurosim.training.config import preset
    from neurosim.training.run import RunInterrupted
    from neurosim.training.run_dir import open_run, resume_run

    cfg = preset("kp_mlp_digits", epochs=2, train_limit=96, batch_size=32, hidden=(8,), device="cpu",
                 monitor_every=0)
    run = open_run(tmp_path / "run", cfg, quiet=True)
    steps = len(run.train_stream)
    with pytest.raises(RunInterrupted):
        run.train(on_step=lambda r: setattr(r, "stop_requested", r.step == steps))
    run.close()
    resumed = resume_run(tmp_path / "run", quiet=True)
    resumed.train()
    resumed.close()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
