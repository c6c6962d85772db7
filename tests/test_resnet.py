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


def _angle(a, b):
    return torch.rad2deg(torch.arccos(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))).item()


def test_weight_mirror_sleep_events_give_every_synapse_enough_noise(monkeypatch):
    # One noise image gives conv1 1024 co-activations per weight (32x32 outputs), a 4x4 convolution
    # of the last stage 16, the classifier 1: sleep_events tops up the synapses that get fewer.
    drawn = {}
    real = WeightMirror.draw_noise

    def spy(self, shape, generator, device, dtype, *layout):
        drawn.setdefault(shape[1:], []).append(shape[0])
        return real(self, shape, generator, device, dtype, *layout)

    monkeypatch.setattr(WeightMirror, "draw_noise", spy)
    for events in (0, 4096):
        drawn.clear()
        c = build_resnet("resnet18", WeightMirror(decay=0.0, sleep_events=events), num_classes=10, width=0.0625)
        c.sleep(2, torch.Generator().manual_seed(0))
        fc, conv1 = c.synapses["fc"], c.synapses["conv1"]
        assert drawn[(3, 32, 32)] == [2 if events == 0 else 4]  # 4096 / 1024 positions
        assert max(drawn[(32,)]) == (2 if events == 0 else 4096)  # the classifier's input: 32 features
        # The classifier's Hebbian estimate of -Wᵀ: hopeless from 2 samples of 32 inputs, close from 4096.
        angle = _angle(-fc.feedback.grad, fc.weight.detach())  # B is kept in W's layout
        assert (angle > 45) if events == 0 else (angle < 10), angle
        assert _angle(-conv1.feedback.grad, conv1.weight.detach()) < 10


def test_unknown_resnet_names_the_choices():
    with pytest.raises(ValueError, match="unknown ResNet 'resnet101'.*resnet50_imagenet"):
        build_resnet("resnet101", Backprop())


@pytest.mark.slow
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


def test_sleep_updates_of_a_channels_last_circuit_come_in_its_layout():
    """Mirror noise is drawn in the weights' layout, so each update lands in ``.grad`` as the
    optimizer's fast path wants it (no conversion per mirror batch)."""
    c = build_resnet("resnet18", WeightMirror(), 10, (3, 16, 16), width=0.0625)
    c.to(memory_format=torch.channels_last)
    c.sleep(4, torch.Generator().manual_seed(0))
    spatial = [s for s in c.synapses.values() if s.feedback.dim() == 4 and s.feedback.shape[-1] > 1]
    assert len(spatial) == 17
    for s in spatial:
        assert s.feedback.grad.is_contiguous(memory_format=torch.channels_last), s.name
