"""benchmarks/gpu_check.py: its smoke run goes through every part, headline first, and writes the
summaries; its plan lists the parts in that order with their budgets; a part stopped at its limit
keeps what it reported; step_time.py keeps finished variants when killed; the divergence watch
starts afresh after the warm-up; the CIFAR-100 pack round-trips and respects the size limit; bad
arguments end in one message."""

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
HEADLINE_FIRST = ("env", "epoch_compiled", "bench_compiled", "bench_eager", "tests")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_check():
    return _load("gpu_check")


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
    (("--plan", "--parts", "epoch_kp"), "--parts: unknown ['epoch_kp']"),
    (("--plan", "--pack-cifar100", "NOWHERE", "DEST"), "takes no OUT_DIR and no --plan"),
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


@pytest.mark.parametrize("script, args, message", [
    ("epoch_time", ["--variants", "kp,nonsense"], "--variants: unknown ['nonsense']"),
    ("epoch_time", ["--epochs", "0"], "--epochs must be at least 1"),
    ("epoch_time", ["--device", "cuda:x"], "unknown --device"),
    ("step_time", ["--dynamic-batch"], "--dynamic-batch needs --compile"),
    ("step_time", ["--sequential", "--profile"], "cannot be used with --sequential"),
])
def test_benchmarks_refuse_bad_arguments(capsys, script, args, message):
    with pytest.raises(SystemExit) as stop:
        _load(script).parse_args(args)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_epoch_time_refuses_an_unwritable_json_file(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert _load("epoch_time").main(["--device", "cpu", "--json", str(tmp_path / "file" / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_parts_put_the_headline_first():
    gc = _gpu_check()
    assert gc.PARTS[:len(HEADLINE_FIRST)] == HEADLINE_FIRST
    assert set(gc.PARTS) == set(gc.TITLES) == set(gc.PLAN["gpu"]) == set(gc.PLAN["smoke"]) == set(gc.WHAT)
    # The headline takes the budget first: nothing is held back for later parts.
    p = gc.plan("gpu", list(gc.PARTS), 420)
    assert [r["part"] for r in p["parts"]] == list(gc.PARTS)
    assert p["parts"][1]["start_s"] == gc.PLAN["gpu"]["env"][2]
    assert p["parts"][1]["fate"] == "expected to finish"
    assert p["expected_total_s"] == sum(v[2] for v in gc.PLAN["gpu"].values())


def test_plan_prints_parts_budgets_and_expected_total():
    gc = _gpu_check()
    proc = _run("--plan", "--budget-s", "200", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = [ln.split()[1] for ln in out.splitlines() if ln[:2].strip().isdigit()]
    assert rows == list(gc.PARTS)
    for name in gc.PARTS:
        least, most, expected = gc.PLAN["gpu"][name]
        line = next(ln for ln in out.splitlines() if ln.split()[1:2] == [name])
        assert f"{least}..{most}" in line and str(expected) in line
    total = sum(v[2] for v in gc.PLAN["gpu"].values())
    assert f"expected total {total} s for a cold machine" in out
    assert f"over the 200 s budget by {total - 200} s" in out
    assert "expected to be skipped" in out  # a 200 s budget cannot reach the last parts
    headline = next(ln for ln in out.splitlines() if ln.split()[1:2] == ["epoch_compiled"])
    assert "expected to finish" in headline
    smoke = _run("--plan", "--smoke", "--parts", "tests,env", timeout=60)
    assert smoke.returncode == 0 and "within the budget" in smoke.stdout
    assert [ln.split()[1] for ln in smoke.stdout.splitlines() if ln[:2].strip().isdigit()] == ["env", "tests"]


def test_a_part_stopped_at_its_limit_keeps_what_it_reported(tmp_path, monkeypatch):
    """The summaries are rewritten while a part runs, and its results so far survive its limit."""
    gc = _gpu_check()
    monkeypatch.setattr(gc, "POLL_S", 0.5)
    args = gc.parse_args([str(tmp_path / "out"), "--smoke", "--parts", "env", "--work-dir", str(tmp_path / "w")])
    check = gc.Check(args)
    result = tmp_path / "partial.json"
    slow = ("import json, sys, time; json.dump({'done': ['first']}, open(sys.argv[1], 'w')); "
            "print('first finished', flush=True); time.sleep(60)")
    seen = []

    def collect(rec, final):
        rec["result"] = gc.read_json(result)
        seen.append((rec["status"], final))

    rec = check.run_part("env", [sys.executable, "-c", slow, str(result)], 3, collect)
    assert rec["status"] == "timeout" and rec["result"] == {"done": ["first"]}
    assert "first finished" in rec["log_tail"]
    assert ("running", False) in seen and seen[-1] == ("timeout", True)
    written = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert written["parts"]["env"]["status"] == "running"  # the last rewrite while it ran
    assert written["parts"]["env"]["result"] == {"done": ["first"]}


@pytest.mark.usefixtures("one_thread")
def test_step_time_keeps_finished_variants_when_stopped(tmp_path, monkeypatch):
    """--json is written per variant as it goes: a run stopped in its second variant keeps the first."""
    st = _load("step_time")
    step = st.Variant.step

    def stop_at_kp(self, x, y):
        if self.name == "kp":
            raise KeyboardInterrupt  # the process is stopped here, as by a time limit
        return step(self, x, y)

    monkeypatch.setattr(st.Variant, "step", stop_at_kp)
    out = tmp_path / "st.json"
    with pytest.raises(KeyboardInterrupt):
        st.main(["--width", "0.0625", "--batch", "4", "--device", "cpu", "--rules", "native,kp", "--reps", "2",
                 "--warmup", "1", "--steps-per-rep", "1", "--sequential", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["phase"] == "timed native"
    native, kp = data["variants"]["native"], data["variants"]["kp"]
    assert len(native["times_s"]) == 2 and native["median_ms"] > 0 and native["warmup_s"] > 0
    assert "median_ms" not in kp and not kp["times_s"]


def test_smoke_run_goes_through_every_part(tmp_path):
    """The GPU check's code path at tiny sizes on this machine: every part runs and reports, the
    headline first."""
    gc = _gpu_check()
    fake_cifar100(tmp_path / "src", train_per_class=2)
    packed = _run("--pack-cifar100", tmp_path / "src", tmp_path / "gpu_data", "--train-per-class", "2")
    assert packed.returncode == 0, packed.stderr
    out = tmp_path / "out"
    proc = _run(out, "--smoke", "--cifar-dir", tmp_path / "gpu_data" / "cifar-100-python", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["mode"] == "smoke" and summary["finished"]
    assert list(summary["parts"]) == summary["order"] == list(gc.PARTS)
    assert set(summary["plan"]) == set(gc.PARTS)
    for name, part in summary["parts"].items():
        if name == "tests" and not torch.cuda.is_available():  # CUDA-only: pytest ran, every test skipped
            assert part["status"] == "skipped" and "no CUDA GPU" in part["reason"], part
            assert part["result"]["tests"] > 0 and part["result"]["failed"] == part["result"]["errors"] == 0
            assert "-m cuda" in part["command"] and "tests/test_cuda.py" in part["command"]
        else:
            assert part["status"] == "ok", (name, part.get("reason"), part.get("log_tail"))
    env = summary["parts"]["env"]["result"]
    assert env["neurosim_from_repo"] and env["torch"] == torch.__version__

    for name, compiled in (("epoch_compiled", True), ("epoch_eager", False)):
        result = summary["parts"][name]["result"]
        assert result["complete"] and result["settings"]["compile"] is compiled
        for variant in ("kp", "native"):
            v = result["variants"][variant]
            assert [e["epoch"] for e in v["epochs"]] == [1, 2], (name, variant)
            for e in v["epochs"]:
                assert e["wall_s"] >= e["time_s"] > 0 and e["images_per_s"] > 0, (name, variant, e)
                if compiled:  # the warm-up compiled everything: no graph compiled during an epoch
                    assert e["compile"]["available"] and e["compile"]["forward_graphs"] == 0, (name, variant, e)
            if compiled:
                warm = v["compile"]
                assert warm["available"] and warm["forward_graphs"] >= 2, (variant, warm)  # training, evaluation
                assert all(g["seconds"] > 0 for g in warm["graphs"])
        kp = result["variants"]["kp"]
        assert kp["monitor_every"] == 2 and kp["preset"] == "kp_resnet18"
        # The warm-up's losses must not reach the restored run's divergence watch.
        assert kp["after_restore"] == {"epoch": 0, "first_loss": None}
        assert kp["watch"]["fresh"] and kp["watch"]["first_loss"] == pytest.approx(kp["watch"]["first_step_loss"])

    for name, rules in (("bench_compiled", ["native", "kp", "wm"]), ("bench_eager", ["native", "kp"])):
        result = summary["parts"][name]["result"]
        assert result["complete"] and result["settings"]["sequential"]
        assert list(result["variants"]) == rules, name
        for v in result["variants"].values():
            assert v["images_per_s"] > 0 and v["warmup_s"] > 0, name
            if name == "bench_compiled":
                assert v["compile"]["available"] and v["compile"]["forward_graphs"] >= 1
    assert summary["parts"]["bench_compiled"]["result"]["settings"]["dynamic_batch"]

    curve = summary["parts"]["cifar"]["result"]["curve"]
    assert [m["epoch"] for m in curve][:2] == [0, 1] and curve[-1]["train_loss"] > 0
    targets = {t["name"]: t for t in summary["targets"]}
    assert set(targets) == {"kp_compiled_speed", "kp_epoch_s", "kp_epoch_s_stretch", "kp_memory"}
    assert targets["kp_compiled_speed"]["basis"] == targets["kp_epoch_s"]["basis"] == "epoch_compiled"
    assert targets["kp_epoch_s"]["value"] == summary["parts"]["epoch_compiled"]["result"]["variants"]["kp"][
        "epochs"][-1]["wall_s"]
    assert targets["kp_memory"]["result"] == "NOT MEASURED"  # CUDA memory only
    assert all(t["passed"] is None for t in targets.values())  # a smoke run judges nothing

    md = (out / "gpu_check.md").read_text()
    headings = ["## Parts", "## Targets", "## Environment", "## One epoch as users run it, compiled",
                "## Step time, torch.compile", "## Step time, eager", "## Tests",
                "## One epoch as users run it, eager", "## kp_resnet18 on packed CIFAR-100"]
    at = [md.find(h) for h in headings]
    assert -1 not in at and at == sorted(at), dict(zip(headings, at))
    assert "random uint8 images of CIFAR-100's shape" in md and "fresh." in md
    log = (out / "gpu_check.log").read_text()
    for name in gc.PARTS:
        assert f" {name}: " in log, name
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
