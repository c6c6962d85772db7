"""benchmarks/gpu_check.py: its smoke run goes through every part and writes the summaries; the
CIFAR-100 pack round-trips and respects the size limit; bad arguments end in one message."""

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_cifar100(root: Path, train_per_class=3, test_per_class=1) -> Path:
    """CIFAR-100 python-format files (bytes keys, as the files read back) with random pixels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.tile(np.arange(100), per_class)
        rng.shuffle(labels)
        split = {b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                 b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(),
                 b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(labels))],
                 b"batch_label": f"fake {name}".encode()}
        (folder / name).write_bytes(pickle.dumps(split, protocol=2))
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_pack_cifar100_round_trips(tmp_path):
    gc = _gpu_check()
    source = fake_cifar100(tmp_path / "src")
    gc.pack_cifar100(tmp_path / "src", tmp_path / "gpu_data", per_class=2, log=lambda *a: None)
    out = tmp_path / "gpu_data" / "cifar-100-python"
    assert sorted(p.name for p in out.iterdir()) == ["PACKED.json", "meta", "test.xz", "train.xz"]
    assert (tmp_path / "gpu_data" / ".gitignore").read_text().splitlines()[-1] == "*"
    manifest = json.loads((out / "PACKED.json").read_text())
    assert (manifest["train_images"], manifest["test_images"], manifest["train_per_class"]) == (200, 100, 2)

    data, packed = gc.load_packed_cifar100(out, "cpu")
    assert packed["train_images"] == 200
    assert data.classes == tuple(f"fine{i}" for i in range(100))
    assert torch.bincount(data.train_y, minlength=100).tolist() == [2] * 100
    train = pickle.loads((source / "train").read_bytes(), encoding="bytes")
    labels = np.asarray(train[b"fine_labels"])
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(100)]))  # first two per class
    assert torch.equal(data.train_x, torch.from_numpy(train[b"data"][keep].reshape(-1, 3, 32, 32)))
    test = pickle.loads((source / "test").read_bytes(), encoding="bytes")
    assert torch.equal(data.test_x, torch.from_numpy(test[b"data"].reshape(-1, 3, 32, 32)))
    assert data.test_y.tolist() == test[b"fine_labels"]


def test_pack_cifar100_refuses_a_copy_over_the_limit(tmp_path):
    gc = _gpu_check()
    fake_cifar100(tmp_path / "src")
    with pytest.raises(gc.CheckError, match="over the"):
        gc.pack_cifar100(tmp_path / "src", tmp_path / "gpu_data", per_class=2, limit=100_000, log=lambda *a: None)
    assert not (tmp_path / "gpu_data").exists()


@pytest.mark.parametrize("args, message", [
    ((), "OUT_DIR is required"),
    (("OUT", "--budget-s", "-5"), "--budget-s must be a positive"),
    (("OUT", "--parts", "env,nonsense"), "--parts: unknown ['nonsense']"),
    (("--pack-cifar100", "NOWHERE", "DEST"), "lacks train, test, meta"),
    (("--pack-cifar100", "NOWHERE", "DEST", "--train-per-class", "0"), "--train-per-class must be 1..500"),
])
def test_bad_arguments_end_in_one_message(tmp_path, args, message):
    args = [str(tmp_path / a) if a in ("OUT", "NOWHERE", "DEST") else a for a in args]
    proc = _run(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "OUT").exists()


def test_smoke_run_goes_through_every_part(tmp_path):
    """The GPU check's code path at tiny sizes on this machine: every part runs and reports."""
    gc = _gpu_check()
    fake_cifar100(tmp_path / "src", train_per_class=2)
    packed = _run("--pack-cifar100", tmp_path / "src", tmp_path / "gpu_data", "--train-per-class", "2")
    assert packed.returncode == 0, packed.stderr
    out = tmp_path / "out"
    proc = _run(out, "--smoke", "--cifar-dir", tmp_path / "gpu_data" / "cifar-100-python", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"] == "smoke" and summary["finished"]
    assert list(summary["parts"]) == list(gc.PARTS)
    for name, part in summary["parts"].items():
        if name == "tests" and not torch.cuda.is_available():  # CUDA-only: pytest ran, every test skipped
            assert part["status"] == "skipped" and "no CUDA GPU" in part["reason"], part
            assert part["result"]["tests"] > 0 and part["result"]["failed"] == part["result"]["errors"] == 0
        else:
            assert part["status"] == "ok", (name, part.get("reason"), part.get("log_tail"))
    env = summary["parts"]["env"]["result"]
    assert env["neurosim_from_repo"] and env["torch"] == torch.__version__
    for name in ("bench_eager", "bench_compiled", "bench_compiled_wm"):
        variants = summary["parts"][name]["result"]["variants"]
        assert variants and all(v["images_per_s"] > 0 for v in variants.values()), name
    for name in ("epoch_kp", "epoch_bp"):
        result = summary["parts"][name]["result"]
        assert result["metrics"]["time_s"] > 0 and result["steps_per_epoch"] > 0, name
        assert result["graphs_compiled_in_warmup"] >= 1, name
    curve = summary["parts"]["cifar"]["result"]["curve"]
    assert [m["epoch"] for m in curve][:2] == [0, 1] and curve[-1]["train_loss"] > 0
    targets = {t["name"]: t for t in summary["targets"]}
    assert set(targets) == {"kp_compiled_speed", "kp_epoch_s", "kp_memory"}
    assert targets["kp_epoch_s"]["value"] > 0 and targets["kp_compiled_speed"]["value"] > 0
    assert all(t["passed"] is None for t in targets.values())  # a smoke run judges nothing

    md = (out / "gpu_check.md").read_text()
    for heading in ("## Parts", "## Targets", "## Environment", "## Tests", "## Step time, eager",
                    "## Step time, torch.compile", "## Step time, torch.compile, wm", "## One training epoch",
                    "## kp_resnet18 on packed CIFAR-100"):
        assert heading in md, heading
    assert "random uint8 images of CIFAR-100's shape" in md
    log = (out / "gpu_check.log").read_text()
    for name in gc.PARTS:
        assert f" {name}: " in log, name
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
