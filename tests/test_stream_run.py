"""Runs that stream an image folder from disk (``neurosim.data.stream``): when, how, and resuming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neurosim.common.errors import DataError
from neurosim.data.stream import FolderStream, open_folder, wants_stream
from neurosim.training.config import preset
from neurosim.training.run import RunInterrupted
from neurosim.training.run_dir import open_run, resume_run


def make_imagenet(root: Path, train: int = 8, val: int = 3, classes=("n01", "n02", "n03"), seed: int = 0) -> Path:
    """A tiny folder in ImageNet's layout: images of two sizes, JPEG and PNG."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (64, 64) if i % 2 else (60, 72)
                a = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
                a[..., c % 3] += 120  # each class has its colour: something to learn
                Image.fromarray(a).save(folder / f"{i:03d}.{'JPEG' if i % 3 else 'png'}")
    return root


def imagenet_config(data_dir: Path, **overrides):
    fields = dict(data_dir=str(data_dir), width=0.0625, image_size=32, batch_size=4, epochs=2, workers=0,
                  device="cpu", monitor_every=2, monitor_probe=8)
    fields.update(overrides)
    if not fields["monitor_every"]:
        del fields["monitor_probe"]  # without a monitor there is no probe to size
    return preset("kp_resnet18_imagenet", **fields)


def test_which_data_is_streamed(tmp_path):
    make_imagenet(tmp_path / "imagenet")
    assert wants_stream("imagenet", tmp_path, "auto")
    assert not wants_stream("imagenet", tmp_path, "off")
    assert not wants_stream("digits", tmp_path, "auto")
    with pytest.raises(DataError, match="digits is small and always held on the device"):
        wants_stream("digits", tmp_path, "on")
    # One tree of equal-sized images is held on the device; one of mixed sizes cannot be.
    same = tmp_path / "same"
    for c in ("a", "b"):
        (same / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(same / c / f"{i}.png")
    assert not wants_stream(str(same), tmp_path, "auto")
    Image.new("RGB", (9, 7)).save(same / "a" / "odd.png")
    assert wants_stream(str(same), tmp_path, "auto")


def test_imagenet_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match="ImageNet is not at .*cannot be downloaded"):
        open_folder("imagenet", tmp_path, None, 32)
    with pytest.raises(DataError, match="ImageNet is not at"):
        wants_stream("imagenet", tmp_path, "auto")


def test_a_streamed_run_trains_and_records(tmp_path):
    make_imagenet(tmp_path / "imagenet")
    run = open_run(tmp_path / "run", imagenet_config(tmp_path), quiet=True)
    assert run.streamed and isinstance(run.train_stream, FolderStream)
    assert run.data.image_shape == (3, 32, 32) and run.data.num_classes == 3
    assert len(run.train_stream) == 6  # 24 images in batches of 4
    m = run.train()
    run.close()
    assert m["epoch"] == 2 and m["step"] == 12
    assert 0 <= m["test_acc"] <= 100 and m["angles"]
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["data"]["image_shape"] == [3, 32, 32]
    assert (tmp_path / "run" / "monitor.npz").exists()


@pytest.mark.slow
def test_a_streamed_run_resumes_mid_epoch_as_if_never_stopped(tmp_path):
    make_imagenet(tmp_path / "imagenet")
    cfg = imagenet_config(tmp_path)
    straight = open_run(tmp_path / "straight", cfg, quiet=True)
    straight.train()
    straight.close()

    stopped = open_run(tmp_path / "stopped", cfg, quiet=True)

    def stop(run):
        if run.step == 8:  # epoch 2, batch 2 of 6
            run.stop_requested = True

    with pytest.raises(RunInterrupted):
        stopped.train(stop)
    stopped.close()
    assert torch.load(tmp_path / "stopped" / "last.pt", weights_only=False)["batch"] == 2
    resumed = resume_run(tmp_path / "stopped", quiet=True)
    resumed.train()
    resumed.close()
    for name, syn in straight.circuit.synapses.items():
        other = resumed.circuit.synapses[name]
        assert torch.equal(syn.weight, other.weight), name
        assert torch.equal(syn.feedback, other.feedback), name


def test_train_limit_takes_a_mixed_subset(tmp_path):
    make_imagenet(tmp_path / "imagenet")
    run = open_run(tmp_path / "run", imagenet_config(tmp_path, train_limit=8, monitor_every=0), quiet=True)
    paths, labels = run.data.train
    assert len(paths) == 8 and len(set(labels)) > 1
    run.close()



def test_evaluate_reads_a_streamed_run_as_it_was_trained(tmp_path, capsys):
    import json

    from neurosim.tools.cli import evaluate

    make_imagenet(tmp_path / "imagenet")
    run = open_run(tmp_path / "run", imagenet_config(tmp_path, epochs=1, monitor_every=0), quiet=True)
    m = run.train()
    run.close()
    assert evaluate([str(tmp_path / "run"), "--last", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "run" / "eval-imagenet-last.json").read_text())
    assert result["images"] == 9
    assert result["top1"] == pytest.approx(m["test_acc"]) and result["loss"] == pytest.approx(m["test_loss"], rel=1e-5)
