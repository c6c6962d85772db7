"""Training on several processes (torch.distributed, gloo on the CPU), checked against one process.

Each test starts 1 or 2 processes of ``tests/dist_worker.py`` the way torchrun would (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and compares what they trained.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neurosim.rules import RULES, KolenPollack
from tests.dist_worker import DISTRIBUTED_RULES

ROOT = Path(__file__).resolve().parents[1]
# One process on the global batch against two on halves: the same images, crops, noise and
# feedback draws; only the order of float32 sums differs (the all-reduce adds two half-batch means).
TOL = dict(rtol=0, atol=2e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out: Path, nprocs: int, *extra: str, timeout: float = 300) -> list[dict]:
    """Run ``mode`` of the worker on ``nprocs`` processes; each rank's saved result."""
    port = _free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                   LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.dist_worker", mode, str(out), *extra],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return [torch.load(out / f"{mode}-{nprocs}-rank{r}.pt", weights_only=False) for r in range(nprocs)]


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"


def assert_close(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(a[k], b[k]), k
            continue
        torch.testing.assert_close(a[k], b[k], **TOL, msg=lambda m, k=k: f"{what}, {k}: {m}")


@pytest.fixture(scope="module")
def every_rule(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    two = launch("every_rule", out, 2)
    one = launch("every_rule", out, 1)[0]
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("rule", DISTRIBUTED_RULES)
def test_ranks_hold_identical_weights(every_rule, rule):
    """After 8 steps W and B are bitwise equal on both ranks, for every rule."""
    _, (r0, r1) = every_rule
    assert_identical(r0[rule], r1[rule])


@pytest.mark.slow
@pytest.mark.parametrize("rule", DISTRIBUTED_RULES)
def test_two_processes_equal_one_on_the_global_batch(every_rule, rule):
    one, (r0, _) = every_rule
    assert_close(one[rule], r0[rule], f"{rule}: 2 processes vs 1")
    # Training changed the weights: the comparison is not between two initial states.
    start = launch_free_initial(rule)
    assert any(not torch.equal(start[k], one[rule][k]) for k in start if k.endswith(".weight"))


def launch_free_initial(rule: str) -> dict:
    from neurosim.training.config import preset
    from neurosim.training.run import build_circuit

    cfg = preset(f"{rule}_mlp_digits")
    c = build_circuit(cfg, (1, 8, 8), 10)
    return {f"{n}.weight": s.weight.detach().clone() for n, s in c.synapses.items()}


def relative_error(a: dict, b: dict) -> float:
    """The largest ‖a − b‖ / ‖b‖ over the tensors (running counts aside)."""
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b
               if not k.endswith("num_batches_tracked") and b[k].norm() > 0)


@pytest.mark.slow
def test_sync_batch_norm_equals_one_process(tmp_path):
    """A ResNet with batch norm: synchronised statistics make 2 × 8 images train as 1 × 16.

    In float64: in float32 a ReLU input within rounding of zero falls on either side depending
    on the order of sums, which made the comparison depend on the CPU. In float64 the two runs
    differ only in that order (statistics combined across ranks, gradients averaged as two half
    means), a few units of float64 rounding (2⁻⁵³ ≈ 1.1e-16) per sum, grown a little by three
    steps: about 5e-15 measured. The bound 1e-12 leaves a factor 200 for other CPUs and is four
    orders below float32 rounding (6e-8), so any float32 step on the way (the statistics once
    computed in ``x.float()``) fails it. Without synchronisation each rank normalises by its own
    8 images: a different computation, differing by O(1) (1.3 measured) in the smallest tensors."""
    r0, r1 = launch("sync_bn", tmp_path, 2)
    (one,) = launch("sync_bn", tmp_path, 1)
    for rule in ("kp", "wm"):
        assert all(t.dtype != torch.float32 for t in one[rule, True].values()), "the circuit must stay float64"
        assert_identical(r0[rule, True], r1[rule, True])
        # Unsynchronised, each rank's running statistics last learned from its own batch.
        assert_identical(*(trained_only(r[rule, False]) for r in (r0, r1)))
        synced = relative_error(r0[rule, True], one[rule, True])
        local = relative_error(r0[rule, False], one[rule, False])
        assert synced < 1e-12, f"{rule}: 2 processes with sync-bn differ from 1 by {synced:.2g}"
        assert local > 1e6 * synced, (rule, synced, local)


@pytest.mark.slow
def test_compiled_circuit_with_sync_batch_norm_trains_on_two_processes(tmp_path):
    """``--sync-bn true --compile true`` under torchrun: Dynamo traces the synchronised batch
    norm's forward (it once built a frozen attrs object there and failed), and the compiled
    circuit trains as the uncompiled one."""
    r0, r1 = launch("compiled_sync_bn", tmp_path, 2)
    assert_identical(r0[True], r1[True])
    assert relative_error(r0[True], r0[False]) < 1e-12


@pytest.mark.parametrize("rule", [n for n, cls in RULES.items() if cls.feedback_follows_forward])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_a_derived_feedback_update_equals_the_one_formed_from_its_own_signals(rule, kind):
    """What ``wrap`` derives from the forward update is what the feedback synapse forms itself."""
    from neurosim.core.kinds import Conv2d, Dense
    from neurosim.rules.base import LocalSignals

    g = torch.Generator().manual_seed(0)
    if kind == "dense":
        k, pre, post = Dense(5, 3), torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)
    else:
        k = Conv2d(2, 3, 3, padding=1)
        pre, post = torch.randn(4, 2, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    pre, post = pre.double(), post.double()
    w, b = (torch.randn(k.weight_shape(), generator=g, dtype=torch.float64) for _ in range(2))
    for r in (RULES[rule](), RULES[rule].example()):  # KP: without decay and with
        gw = r.forward_update(LocalSignals(k, pre, post, w))
        derived = r.feedback_from_forward(gw, w, b)
        torch.testing.assert_close(derived, r.feedback_update(LocalSignals(k, pre, post, b)), rtol=1e-12,
                                   atol=1e-12)
        assert derived is not gw


def test_kolen_pollack_derives_its_feedback_update():
    assert KolenPollack.feedback_follows_forward


@pytest.mark.slow
def test_kp_all_reduces_what_backprop_does(tmp_path):
    """KP's ``ΔB`` is derived on every rank from the all-reduced ``ΔW``, not all-reduced itself:
    per step DDP moves the forward side's updates alone, as for backprop, and ``B`` still ends
    bitwise equal on both ranks and equal to one process on the global batch (float64: only the
    order of sums differs, ~1e-15 measured)."""
    r0, r1 = launch("reduced", tmp_path, 2)
    (one,) = launch("reduced", tmp_path, 1)
    kp, bp = r0["kp"], r0["bp"]
    assert kp["bytes"] == bp["bytes"] == kp["forward_bytes"] == bp["forward_bytes"], (kp["bytes"], bp["bytes"])
    for rule in ("kp", "bp"):
        assert_identical(r0[rule]["weights"], r1[rule]["weights"])
        assert relative_error(r0[rule]["weights"], one[rule]["weights"]) < 1e-12, rule
    feedback = [k for k in kp["weights"] if k.endswith(".feedback")]
    assert len(feedback) == 3 and all(not torch.equal(kp["weights"][k], kp["start"][k]) for k in feedback)


def test_the_scaling_benchmark_counts_what_ddp_all_reduces():
    """``benchmarks/scaling.py`` counts the buckets DDP reduces in a real step: KP's as many as
    backprop's, the forward side's parameters at 4 bytes each."""
    import importlib.util

    from neurosim.training.config import preset
    from neurosim.training.run import build_circuit

    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    kp, bp = scaling.traffic("kp_mlp_digits", []), scaling.traffic("bp_mlp_digits", [])
    c = build_circuit(preset("kp_mlp_digits"), (1, 8, 8), 10)
    forward = sum(4 * p.numel() for n, p in c.named_parameters() if not n.endswith(".feedback"))
    assert kp["grad_bytes"] == bp["grad_bytes"] == forward
    assert kp["derived_feedback_bytes"] == sum(4 * s.feedback.numel() for s in c.synapses.values())
    assert bp["derived_feedback_bytes"] == 0


def trained_only(weights: dict) -> dict:
    """The weights a step trains, without batch norm's running statistics."""
    return {k: v for k, v in weights.items() if not k.rsplit(".", 1)[-1].startswith(("running_", "num_batches"))}


@pytest.mark.slow
def test_a_stop_asked_of_one_rank_stops_all_at_the_same_step(tmp_path):
    r0, r1 = launch("stop", tmp_path, 2)
    # Asked in step 3 on rank 1; heard by all at the epoch's end (8 steps), honoured at the next.
    assert r0["stopped"] == r1["stopped"] == 9
    assert_identical(r0["weights"], r1["weights"])
    saved = torch.load(tmp_path / "stop" / "last.pt", weights_only=False)
    assert saved["step"] == 9 and saved["world"] == 2
    assert not (tmp_path / "stop" / "metrics.jsonl.tmp").exists()


@pytest.mark.slow
def test_resume_continues_as_if_never_stopped(tmp_path):
    r0, r1 = launch("resume", tmp_path, 2)
    assert_identical(r0["resumed"], r1["resumed"])
    assert_identical(r0["resumed"], r0["straight"])
    # Only rank 0 wrote: one metrics file with one record per epoch (and the start).
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(tmp_path):
    launch("resume", tmp_path, 2)
    (one,) = launch("refuse", tmp_path, 1, str(tmp_path / "straight"))
    assert "trained by 2 processes (global batch 32)" in one["error"]
    assert "torchrun --nproc_per_node=2" in one["error"]


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "experiments" / "run_circuit.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_trains_the_digits_circuit_end_to_end(tmp_path):
    """The README's command: two processes, one run directory written by rank 0."""
    out = tmp_path / "run"
    done = torchrun("kp_mlp_digits", "--device", "cpu", "--epochs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final: test top-1") == 1  # rank 0 reports, the other rank is silent
    assert "2 processes on cpu: global batch 64 (32 per process)" in done.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert {"config.json", "last.pt", "best.pt", "monitor.npz", "accuracy.png"} <= {p.name for p in out.iterdir()}
    assert torch.load(out / "last.pt", weights_only=False)["world"] == 2

    again = torchrun("kp_mlp_digits", "--device", "cpu", "--epochs", "1", "--out", str(out))
    assert again.returncode != 0
    said = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert said == [f"error: {out} already holds a run; use --resume {out} to continue it or choose another --out"]


@pytest.mark.slow
def test_a_streamed_folder_trains_alike_on_two_processes(tmp_path):
    """ImageNet's layout read from disk: each rank decodes its half of every global batch."""
    from tests.test_stream_run import make_imagenet

    make_imagenet(tmp_path / "data" / "imagenet")
    r0, r1 = launch("stream", tmp_path, 2, str(tmp_path / "data"))
    (one,) = launch("stream", tmp_path, 1, str(tmp_path / "data"))
    assert r0["steps"] == one["steps"] == 2
    assert_identical(r0["weights"], r1["weights"])
    assert relative_error(r0["weights"], one["weights"]) < 1e-4


@pytest.mark.slow
def test_torchrun_trains_an_imagenet_resnet_on_a_folder(tmp_path):
    from tests.test_stream_run import make_imagenet

    make_imagenet(tmp_path / "data" / "imagenet")
    out = tmp_path / "run"
    done = torchrun("kp_resnet18_imagenet", "--data-dir", str(tmp_path / "data"), "--width", "0.0625",
                    "--image-size", "32", "--batch-size", "2", "--epochs", "1", "--workers", "1", "--device", "cpu",
                    "--monitor-every", "2", "--monitor-probe", "8", "--sync-bn", "true", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 4 (2 per process), lr 0.0015625 (= 0.1 x 4/256, the linear scaling rule)" in done.stderr
    assert done.stdout.count("final: test top-1") == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
