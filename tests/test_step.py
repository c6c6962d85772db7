"""The step functions, the run's callbacks and its log, each on its own."""

import json

import torch
import torch.nn.functional as F

from neurosim.training.config import preset
from neurosim.training.callbacks import Callback
from neurosim.training.run_dir import open_run
from neurosim.training.run_log import RunLog
from neurosim.training.step import engaged_step, sleep_steps


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def after_step(self, step):
        self.calls.append(("after_step", step))

    def before_sleep(self, step):
        self.calls.append(("before_sleep", step))

    def after_sleep(self, step):
        self.calls.append(("after_sleep", step))

    def on_checkpoint(self, run_dir):
        self.calls.append(("on_checkpoint", (run_dir / "last.pt").exists()))


def test_callbacks_see_steps_sleeps_and_checkpoints_in_order(tmp_path):
    cfg = preset("wm_mlp_digits", epochs=1, device="cpu", monitor_every=0, wm_sleep_batches=1)
    run = open_run(tmp_path / "r", cfg, quiet=True)
    assert run.callbacks == [] and len(run.sleep_groups) == 1
    recorder = Recorder()
    run.callbacks.append(recorder)
    run.train()
    calls = recorder.calls
    assert calls[:2] == [("before_sleep", 0), ("after_sleep", 0)]  # the sleep before training
    assert [c for c in calls if c[0] == "after_step"] == [("after_step", s) for s in range(1, run.step + 1)]
    sleeps = [c for c in calls if c[0] == "before_sleep"]
    assert len(sleeps) == len([c for c in calls if c[0] == "after_sleep"]) >= 1
    assert calls[-1] == ("on_checkpoint", False)  # before last.pt is written
    assert (tmp_path / "r" / "last.pt").exists()


def test_monitor_is_a_callback(tmp_path):
    cfg = preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=5)
    run = open_run(tmp_path / "r", cfg, quiet=True)
    assert [type(c).__name__ for c in run.callbacks] == ["MonitorCallback"]
    assert run.callbacks[0].monitor is run.monitor
    run.train()
    assert run.monitor.steps[-1] == run.step - run.step % 5
    assert (tmp_path / "r" / "monitor.npz").exists()


def test_engaged_step_on_a_plain_module_and_a_circuit(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    before = net.weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    loss, out = engaged_step(None, net, opt, x, y, F.cross_entropy, None, None)
    assert out.shape == (5, 3) and loss.shape == () and not torch.equal(before, net.weight)

    # Run.engaged_step is the function plus the run's statistics.
    cfg = preset("wm_mlp_digits", epochs=1, device="cpu", monitor_every=0)
    a, b = (open_run(tmp_path / name, cfg, quiet=True) for name in "ab")
    x, y = a.train_stream.batch(0, 0)
    a.engaged_step(x, y)
    loss, _ = engaged_step(b.circuit, b.model, b.optimizer, x, y, b.loss_fn, b.amp_dtype, b.sleep_generator,
                           cfg.execution)
    assert a.step == 1 and float(a.stats[0]) == float(loss.detach().double() * y.shape[0])
    sleep_steps(a.circuit, a.sleep_optimizer, 2, 8, a.sleep_generator)
    sleep_steps(b.circuit, b.sleep_optimizer, 2, 8, b.sleep_generator)
    for (k, ta), tb in zip(a.circuit.state_dict().items(), b.circuit.state_dict().values()):
        assert torch.equal(ta, tb), k


def test_run_log_writes_metrics_and_keeps_quiet(tmp_path, capsys):
    log = RunLog(tmp_path, quiet=True)
    m = {"epoch": 1, "test_acc": 50.0, "angles": {"s": 10.0}, "train_loss": 1.0, "train_acc": 2.0,
         "test_loss": 3.0, "test_top5": 4.0, "mean_angle": 10.0, "images_per_s": 5.0}
    log.metrics(tmp_path / "metrics.jsonl", m)
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == m
    log.start_epoch(0, 0.0)
    log.after_batch(0, 1, 1, 2, torch.zeros(2, dtype=torch.float64), 8, 8, log_every=1)
    log.epoch_summary(1, 1, m)
    assert capsys.readouterr().err == ""
    log.quiet = False
    log.after_batch(0, 1, 1, 2, torch.zeros(2, dtype=torch.float64), 8, 8, log_every=1)
    log.epoch_summary(1, 1, m)
    err = capsys.readouterr().err
    assert "epoch 1/1 [1/2]" in err and "top1 50.00%" in err
