"""Options refused before a run writes anything: numbers the run's float32 and int64 arithmetic
cannot hold, sizes its device's memory cannot hold, and settings it would not read.

Each refusal is one ``error:`` line and status 2, with no directory left at ``--out``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import neurosim.tools.cli.budget as budget
from neurosim.common.errors import UserError
from neurosim.tools.cli import evaluate, main, run_circuit
from neurosim.training.applies import REAL_RANGE, representable_problem
from neurosim.training.config import RunConfig, from_saved, preset

GIB = 2**30


@pytest.fixture
def refused(tmp_path, capsys, monkeypatch):
    """``refused(*argv)``: the one message with which ``run_circuit.py argv --out DIR`` ends,
    checked to be one line, status 2, no traceback, and DIR never made. The machine is given
    16 GiB of memory, so that what is too large does not depend on where the test runs."""
    monkeypatch.setattr(budget, "host_memory", lambda: 16 * GIB)
    out = tmp_path / "run"

    def call(*argv):
        with pytest.raises(SystemExit) as done:
            main(run_circuit, [*map(str, argv), "--out", str(out)])
        err = capsys.readouterr().err
        said = [line for line in err.splitlines() if line.startswith("error:")]
        assert done.value.code == 2 and len(said) == 1 and "Traceback" not in err, err
        assert not out.exists()
        return said[0]

    return call


@pytest.fixture
def folder(tmp_path):
    """Two classes of six 12×12 images each: few and of one size, so ``--stream auto`` decodes it."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                tmp_path / "images" / name / f"{i}.png")
    return tmp_path / "images"


# -- numbers the run cannot compute with -----------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["wm_mlp_digits", "--lr", "1e300"],
    ["wm_mlp_digits", "--weight-decay", "1e300"],
    ["wm_mlp_digits", "--wm-lr", "1e300"],
    ["wm_mlp_digits", "--wm-decay", "1e300"],
    ["wm_mlp_digits", "--wm-sigma", "1e300"],  # an OverflowError once
    ["wm_mlp_digits", "--wm-sigma", "1e-300"],  # a ZeroDivisionError once
    ["kp_mlp_digits", "--kp-decay", "1e-300"],
])
def test_real_settings_outside_what_float32_computes_with_are_refused(refused, argv):
    message = refused(*argv)
    assert f"{argv[1]} {float(argv[2]):g} cannot be computed with" in message
    assert "between 1.1e-19 and 9.2e+18" in message


def test_the_representable_range_is_that_of_a_float32_square():
    lo, hi = REAL_RANGE
    assert np.float32(lo) ** 2 > 0 and np.isfinite(np.float32(hi) ** 2)
    for ok in (0.0, lo, -lo, hi, 0.05, 1e18):
        assert representable_problem("lr", ok) is None
    for bad in (lo / 2, hi * 2, 1e300, 1e-300, float("nan"), float("inf")):
        assert representable_problem("lr", bad) is not None


def test_whole_numbers_beyond_64_bits_are_refused(refused):
    assert "64-bit integers" in refused("wm_mlp_digits", "--epochs", 10**30)
    assert "64-bit integers" in refused("wm_mlp_digits", "--hidden", f"64,{10**30}")


# -- sizes the device's memory cannot hold ---------------------------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["wm_mlp_digits", "--wm-sleep-batch-size", "1000000000"], "--wm-sleep-batch-size 1000000000"),
    (["wm_mlp_digits", "--wm-sleep-events", "2000000000"], "--wm-sleep-events 2000000000"),
    (["wm_mlp_digits", "--hidden", "100000000000"], "--hidden 100000000000"),
    (["kp_resnet18", "--data", "synthetic", "--width", "1000000"], "--width 1e+06"),
    (["kp_resnet18", "--data", "synthetic", "--synthetic-train", "1000000000"], "--synthetic-train 1000000000"),
])
def test_settings_that_size_allocations_are_refused_before_anything_is_written(refused, argv, named):
    message = refused(*argv, "--device", "cpu")
    assert message.startswith(f"error: {named} makes this run too large for this machine's memory")
    assert "and this machine's memory (RAM) has 16.0 GiB" in message


def test_a_huge_streamed_image_size_is_refused_by_its_memory(refused, folder):
    message = refused("kp_resnet18_imagenet", "--data", folder, "--stream", "on", "--image-size", 4096,
                      "--device", "cpu")
    assert message.startswith("error: --image-size 4096 makes this run too large")


def test_on_a_gpu_its_own_memory_is_what_counts(monkeypatch, folder):
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=80 * GIB, name="a GPU"))
    monkeypatch.setattr(budget, "host_memory", lambda: 1024 * GIB)
    cfg = preset("kp_resnet18_imagenet", data=str(folder), stream="on", image_size=4096, device="cuda")
    with pytest.raises(UserError, match=r"--image-size 4096 makes this run too large for cuda:0 \(a GPU\): it would "
                                        r"need at least .* TiB .* and cuda:0 \(a GPU\) has 80.0 GiB"):
        budget.check_budget(cfg, ["image_size"])
    budget.check_budget(preset("kp_resnet18_imagenet", data=str(folder), stream="on", device="cuda"))


def test_the_estimate_counts_weights_their_copies_and_the_sleep_noise():
    cfg = preset("wm_mlp_digits", wm_sleep_batch_size=1000, device="cpu")
    facts = budget.data_facts(cfg)
    assert facts == budget.DataFacts((1, 8, 8), 10, 1437, 360, streamed=False)
    parts = {p.what: p for p in budget.estimate(cfg, facts, budget._meta_circuit(cfg, facts), budget._device(cfg))}
    # 64-128-64-10 with biases: 17,226 forward values and 17,024 feedback ones, all learned; momentum
    # for the forward ones (the feedback weights learn in sleep, by plain SGD).
    assert parts["the circuit's weights with their gradients and momentum"].host == 4 * (34250 + 34250 + 17226)
    assert parts["a checkpoint's two host copies of the state"].host == 2 * 4 * (34250 + 17226)
    # x->h1 and h1->h2 have the largest mirror batch: 1000 images of 64 noise values and 128 responses.
    assert parts["one mirror batch of a sleep (noise and response)"].host == 1000 * (64 + 128) * 4
    assert parts["the images held in memory"].host == (1437 + 360) * 64


def test_a_run_that_fits_is_not_refused():
    budget.check_budget(preset("kp_resnet18", data="synthetic", width=0.0625, device="cpu"))
    budget.check_budget(preset("wm_mlp_digits", device="cpu"))


# -- image sizes the model cannot take -------------------------------------------------------------

def test_an_image_size_below_two_is_refused(refused, folder):
    # PyTorch's antialiased resize failed on an internal assert at 1 pixel.
    assert "image_size must be at least 2" in refused("kp_resnet18_imagenet", "--data", folder, "--stream", "on",
                                                      "--image-size", "1")


@pytest.mark.parametrize("argv", [
    ["kp_resnet18_imagenet", "--stream", "on", "--image-size", "2", "--batch-size", "1"],
    ["kp_resnet18", "--stream", "on", "--image-size", "8", "--batch-size", "1"],
])
def test_batch_norm_over_a_single_value_is_refused(refused, folder, argv):
    message = refused(*argv, "--data", folder, "--workers", "0")
    assert "batch norm needs more than one value per channel, and --batch-size 1 gives one" in message
    assert "is 1×1" in message


def test_a_last_batch_of_one_image_under_batch_norm_is_refused(refused):
    # digits: 1437 training images, so batches of 2 leave one image for the last
    message = refused("kp_resnet18", "--data", "digits", "--batch-size", "2", "--width", "0.0625")
    assert "the last batch of each epoch (1437 training images in batches of 2)" in message


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kp_resnet18_imagenet", "kp_resnet18", "kp_mlp_digits"])
def test_the_smallest_image_size_trains(name, folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(run_circuit, [name, "--data", str(folder), "--stream", "on", "--image-size", "2", "--batch-size", "2",
                           "--workers", "0", "--epochs", "1", "--monitor-every", "0", "--device", "cpu", "--quiet",
                           *(["--width", "0.0625"] if "resnet" in name else []), "--out", str(tmp_path / "run")])
    assert done.value.code == 0, capsys.readouterr().err


# -- settings the run would not read, and values that cannot be meant -----------------------------

@pytest.mark.parametrize("argv, message", [
    (["--synthetic-train", "64"], "--synthetic-train applies to --data synthetic only"),
    (["--synthetic-test", "64"], "--synthetic-test applies to --data synthetic only"),
    (["--image-size", "64"], "--image-size applies to image folders only"),
    (["--workers", "2"], "--workers applies to image folders only"),
    (["--val-per-class", "5"], "--val-per-class applies to image folders only"),
    (["--data-dir", "elsewhere"], "--data-dir applies to data kept in a directory only (--data cifar10 or cifar100, "
                                  "and image folders: where they are kept or downloaded, and decoded folders cached); "
                                  "this run's data is digits, which needs none"),
    (["--data-dir", ""], "option --data-dir has an empty value"),
    (["--val-per-class", ""], "option --val-per-class has an empty value; give a whole number (or none)"),
    (["--lr-gamma", "0.5"], "--lr-gamma applies only with --milestones"),
    (["--milestones", "100", "--epochs", "1"], "milestone 100 would never take effect"),
    (["--sync-bn", "true"], "--sync-bn applies to ResNets only; wm_mlp_digits is an MLP: it has no batch norm"),
    (["--channels-last", "on"], "--channels-last applies to ResNets only"),
    (["--crop-padding", "1000"], "pads the 8×8 images of digits by 1000 pixels on each side, so a random crop"),
    (["--train-limit", "5000"], "--train-limit 5000 is more than the 1437 training images of digits"),
    (["--monitor-every", "0", "--monitor-traces", "4"], "--monitor-traces applies only with --monitor-every"),
    (["--lr", "1", "--lr", "2"], "option --lr is given twice; give it once"),
    (["--lr=1", "--lr", "2"], "option --lr is given twice; give it once"),
    (["--wm-lr", "0.1", "--wm_lr=0.2"], "option --wm-lr is given twice"),
])
def test_digits_refuses_settings_it_would_not_read(refused, argv, message):
    assert message in refused("wm_mlp_digits", *argv)


@pytest.mark.parametrize("argv, message", [
    (["--sync-bn", "true"], "--sync-bn applies under torchrun with several processes only"),
    (["--data", "synthetic", "--image-size", "64"], "--image-size applies to image folders only"),
    (["--width", "1e-9"], "--width 1e-09 gives a ResNet's first stage round(64 × 1e-09) = 0 channels"),
    (["--hidden", "64"], "--hidden applies to MLPs only and kp_resnet18 is a resnet18"),
])
def test_resnets_refuse_settings_they_would_not_read(refused, argv, message):
    assert message in refused("kp_resnet18", *argv)


@pytest.mark.parametrize("argv, message", [
    (["--stream", "on", "--flip", "false"], "--flip applies to data held in memory only"),
    (["--stream", "on", "--crop-padding", "2"], "--crop-padding applies to data held in memory only"),
    (["--stream", "off", "--workers", "2"], "/images is decoded once and held in memory (--stream off)"),
    (["--image-size", "64"], "is decoded once and held in memory (--stream auto, since its images are of one size"),
    (["--workers", "2"], "--workers applies to folders read from disk as the run trains only"),
    (["--val-per-class", "0"], "a folder needs at least one test image per class"),
])
def test_folders_refuse_settings_they_would_not_read(refused, folder, argv, message):
    assert message in refused("kp_resnet18", "--data", folder, *argv)


def test_a_folder_of_train_and_val_refuses_a_hold_out(refused, folder, tmp_path):
    split = tmp_path / "split"
    for part in ("train", "val"):
        (split / part).mkdir(parents=True)
        for name in ("cat", "dog"):
            (folder / name).rename(split / part / name) if part == "train" else (split / part / name).mkdir()
    assert "holds train/ and val/, and val/ is its test split" in refused("kp_resnet18", "--data", split,
                                                                          "--val-per-class", "2")


def test_settings_given_where_they_apply_or_at_the_value_they_have_pass(monkeypatch, folder):
    preset("kp_resnet18", epochs=2)  # the preset's milestones with a short run: README's --epochs 2
    preset("kp_mlp_digits", workers=4, image_size=224, lr_gamma=0.2)  # the values they have anyway
    preset("kp_resnet18", data=str(folder), stream="on", workers=0, image_size=32, val_per_class=1)
    preset("kp_resnet18", milestones=(1,), lr_gamma=0.5, epochs=2, crop_padding=31, data="synthetic",
           synthetic_train=64)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun
    preset("kp_resnet18", sync_bn=True)


def test_a_saved_configuration_checks_the_options_given_with_it():
    saved = preset("kp_mlp_digits", epochs=1)
    for overrides, message in ((dict(data_dir="x"), "--data-dir applies to data kept in a directory only"),
                               (dict(width=0.5), "--width applies to ResNets only"),
                               (dict(milestones=(5,)), "milestone 5 would never take effect")):
        with pytest.raises(UserError, match=message):
            from_saved(saved, overrides)
    custom = RunConfig(epochs=1, data="synthetic")
    with pytest.raises(UserError, match="--hidden applies to MLPs only and this configuration is a resnet18"):
        from_saved(RunConfig(model="resnet18"), dict(hidden=(8,)))
    assert from_saved(custom, dict(synthetic_train=64)).synthetic_train == 64


# -- evaluate.py -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from neurosim.training.run_dir import open_run

    root = tmp_path_factory.mktemp("evaluate")
    run = open_run(root / "run", preset("bp_mlp_digits", epochs=1, hidden=(8,), train_limit=96, device="cpu",
                                        monitor_every=0), quiet=True)
    run.train()
    run.lock.release()
    return root / "run"


@pytest.mark.parametrize("argv, message", [
    (["--val-per-class", str(10**20)], "--val-per-class applies to image folders only"),
    (["--data-dir", "x"], "--data-dir applies to data kept in a directory only"),
    (["--last", "--last"], "option --last is given twice"),
    (["--device", "cpu", "--device=cpu"], "option --device is given twice"),
    (["--split", "test", "--val-per-class", ""], "option --val-per-class needs a value"),
])
def test_evaluate_refuses_options_it_would_not_read(digits_run, capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        main(evaluate, [str(digits_run), *argv])
    err = capsys.readouterr().err
    assert done.value.code == 2 and message in err and err.count("error:") == 1, err
    assert not list(digits_run.glob("eval-*"))


def test_evaluate_on_a_folder_refuses_an_empty_or_unread_hold_out(digits_run, folder, capsys):
    for argv, message in ((["--split", "test", "--val-per-class", "0"], "--val-per-class 0 holds no image out"),
                          (["--val-per-class", "2"], "--val-per-class applies with --split test only")):
        with pytest.raises(SystemExit) as done:
            main(evaluate, [str(digits_run), "--data", str(folder), *argv])
        err = capsys.readouterr().err
        assert done.value.code == 2 and message in err, err


# -- what --resume says of a run directory whose config.json is no preset's ------------------------

def _unfinished_run(tmp_path, text: str):
    from neurosim.training.run_dir import open_run

    run = open_run(tmp_path / "run", preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0), quiet=True)
    run.lock.release()
    (tmp_path / "run" / "config.json").write_text(text)
    return tmp_path / "run"


def test_a_config_json_that_is_no_object_is_not_taken_for_a_custom_run(tmp_path):
    from neurosim.training.run_dir import resume_run

    run_dir = _unfinished_run(tmp_path, "[]")
    with pytest.raises(UserError) as e:
        resume_run(run_dir, expect=preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0))
    assert "a configuration is a JSON object of settings, not list" in str(e.value)
    assert "custom" not in str(e.value)
    with pytest.raises(UserError, match="a configuration is a JSON object of settings"):
        RunConfig.from_dict([])


def test_a_run_of_its_own_configuration_is_resumed_without_a_preset(tmp_path):
    from neurosim.training.run_dir import resume_run

    run_dir = _unfinished_run(tmp_path, json.dumps({"epochs": 1}))  # preset "custom": no preset's
    with pytest.raises(UserError) as e:
        resume_run(run_dir, expect=preset("kp_mlp_digits", epochs=1, device="cpu", monitor_every=0))
    assert "custom --resume" not in str(e.value)
    assert f"a configuration of its own ('custom' is no preset), not kp_mlp_digits; resume it without naming a " \
           f"preset: --resume {run_dir}" in str(e.value)
