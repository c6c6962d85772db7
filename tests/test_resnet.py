"""ResNet circuits (CIFAR and ImageNet layouts): standard sizes, every conv plastic, and the
headline CLI job end to end. tests/test_imagenet_models.py compares the ImageNet ones with
torchvision."""

import json

import pytest
import torch

from neurosim.models import build_resnet
from neurosim.rules import Backprop, KolenPollack, WeightMirror
from tests.test_cli import cli


def test_resnet18_has_the_standard_cifar_parameter_count():
    c = build_resnet("resnet18", Backprop(), num_classes=100)
    assert sum(p.numel() for p in c.parameters()) == 11_220_132  # torchvision-style CIFAR ResNet-18
    assert len(c.synapses) == 21  # 17 convs + 3 shortcuts + fc: every one plastic


@pytest.mark.parametrize("imagenet", [False, True])
@pytest.mark.parametrize("depth, synapses", [("resnet18", 21), ("resnet34", 37), ("resnet50", 54)])
def test_reduced_width_circuits_run(depth, synapses, imagenet):
    size = 64 if imagenet else 32
    depth = f"{depth}_imagenet" if imagenet else depth
    c = build_resnet(depth, KolenPollack(), num_classes=7, in_shape=(3, size, size), width=0.0625)
    assert len(c.synapses) == synapses
    assert all(s.feedback is not None for s in c.synapses.values())
    assert ("stem_pool" in c.populations) is imagenet
    out = c(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(s.weight.grad is not None and s.feedback.grad is not None for s in c.synapses.values())


def test_weight_mirror_resnet_sleeps_every_synapse():
    c = build_resnet("resnet18", WeightMirror(), num_classes=10, width=0.0625)
    c.sleep(2, torch.Generator().manual_seed(0))
    assert all(s.feedback.grad is not None for s in c.synapses.values())


def test_unknown_resnet_names_the_choices():
    with pytest.raises(ValueError, match="unknown ResNet 'resnet101'.*resnet50_imagenet"):
        build_resnet("resnet101", Backprop())


@pytest.mark.parametrize("name", ["kp_resnet18", "kp_resnet18_imagenet"])
def test_kp_resnet18_cli_smoke(tmp_path, name):
    out = tmp_path / "run"
    r = cli(name, "--data", "synthetic", "--epochs", "1", "--width", "0.0625", "--synthetic-train", "64",
            "--synthetic-test", "32", "--batch-size", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["epoch"] == 1 and len(lines[-1]["angles"]) == 21
    assert {"last.pt", "best.pt", "config.json", "angles_by_epoch.png"} <= {p.name for p in out.iterdir()}
    ev = cli(str(out), "--data", "synthetic", script="evaluate.py")
    assert ev.returncode == 0, ev.stderr
    assert "top-1" in ev.stdout
