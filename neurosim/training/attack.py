"""Adversarial robustness of a trained circuit: FGSM and PGD in an L∞ ball given in pixel units.

The attacker knows the weights. Its input gradients are those of true backprop through the
circuit (``Circuit.backprop_truth``: every synapse's rule swapped for ``Backprop``, feedback
pathways off), whatever rule trained it: the gradient a feedback-alignment circuit would send
back to its input travels through ``B``, not ``W``, and would make a weaker, different attack.
The circuit is attacked in eval mode (batch norm frozen); no parameter, buffer or ``.grad``
changes.

Pixel units: a batch reaches the circuit normalised, ``x = (p − mean) / std`` per channel, where
``p ∈ [0, 1]`` is the stored 8-bit image divided by 255 (``BatchStream``, ``FolderStream``). An
``eps`` in pixel units is ``eps / std`` in the circuit's input space, channel by channel, and the
valid range ``p ∈ [0, 1]`` is ``[−mean / std, (1 − mean) / std]`` there; ``PixelSpace`` holds both.
The digits are scikit-learn's 17 gray levels (0..16) stored as 0..255, so on digits one level is
16/255 in pixel units and ``eps = 8/255`` is half a level.

``robustness(...)`` scores every batch of a stream clean and under each strength; the result is
written into the run directory as ``robustness.json`` (``write_robustness``, merged with what
is there), where ``read_robustness`` and the rule study's report find it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import attrs
import torch

from neurosim.common.errors import UserError
from neurosim.common.files import describe_os_error, write_atomic
from neurosim.core.circuit import Circuit

ATTACKS = ("fgsm", "pgd")
ROBUSTNESS_FILE = "robustness.json"
FORMAT = 1
GRADIENT_NOTE = ("input gradients by true backprop through the circuit's forward weights (the attacker knows "
                 "them), whatever rule trained it")
PGD_STEP_FACTOR = 2.5  # the default PGD step: 2.5 · eps / steps, so the steps can cross the ball


def parse_eps(text: str) -> tuple[tuple[str, float], ...]:
    """``--eps 2/255,4/255,0.05`` as ``(("2/255", 0.00784…), …)``: fractions or decimals in pixel
    units, each from 0 to 1, none twice. Anything else is a ``UserError`` naming the bad item."""
    items = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(items):
        raise UserError(f"--eps {text!r}: give strengths separated by commas, e.g. --eps 2/255,4/255,8/255")
    out, seen = [], set()
    for item in items:
        value = eps_value(item, "--eps")
        if value in seen:
            raise UserError(f"--eps {text!r} gives {item} twice; give each strength once")
        seen.add(value)
        out.append((item, value))
    return tuple(out)


def eps_value(item: str, option: str) -> float:
    """One strength in pixel units: ``8/255`` or ``0.03``, from 0 to 1."""
    try:
        value = float(Fraction(item)) if "/" in item else float(item)
    except (ValueError, ZeroDivisionError, OverflowError):
        value = math.nan
    if not math.isfinite(value):
        raise UserError(f"bad value {item!r} for {option}: expected a number in pixel units [0, 1] such as 8/255 "
                        f"or 0.03")
    if not 0 <= value <= 1:
        raise UserError(f"bad value {item!r} for {option}: it must be from 0 to 1 (pixel units, where 1 is the whole "
                        f"intensity range), e.g. 8/255")
    return value


@attrs.frozen
class Attack:
    """FGSM (one step ``x + eps·sign(∇x)``) or PGD (``steps`` signed steps of ``step_size`` pixel
    units, default ``2.5·eps/steps``, each projected to the L∞ ball of radius eps and the valid
    range; from a uniform random point of the ball with ``random_start``, drawn from ``seed``)."""

    kind: str = attrs.field(validator=attrs.validators.in_(ATTACKS))
    steps: int = 1
    step_size: float | None = None  # pixel units; None: PGD_STEP_FACTOR · eps / steps
    random_start: bool = False
    seed: int = 0

    def step(self, eps: float) -> float:
        if self.kind == "fgsm":
            return eps
        return self.step_size if self.step_size is not None else PGD_STEP_FACTOR * eps / self.steps

    def describe(self) -> str:
        if self.kind == "fgsm":
            return "FGSM (one step of eps·sign(∇x))"
        size = (f"{self.step_size:g}" if self.step_size is not None else f"{PGD_STEP_FACTOR:g}·eps/{self.steps}")
        start = f", random start (seed {self.seed})" if self.random_start else ", from the clean image"
        return f"PGD ({self.steps} steps of {size}, projected to the eps ball and [0, 1]{start})"

    def label(self) -> str:
        """A short name for a report's column: ``FGSM``, ``PGD-10``, ``PGD-10 rs``."""
        if self.kind == "fgsm":
            return "FGSM"
        size = f" step {self.step_size:g}" if self.step_size is not None else ""
        return f"PGD-{self.steps}{size}" + (" rs" if self.random_start else "")

    def settings(self) -> dict:
        return {"attack": self.kind, "steps": self.steps, "step_size": self.step_size,
                "random_start": self.random_start, "seed": self.seed if self.random_start else None}


class PixelSpace:
    """The circuit's input space seen in pixel units: per-channel ``mean`` and ``std`` (of the
    pixels in [0, 1]) as the data were normalised with."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device):
        c = len(mean)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, c, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, c, 1, 1)
        # As the streams normalise: p · 1/(255·std)·255 − mean/std, so the bounds match their values.
        scale = 1.0 / (255.0 * std_t)
        self.low = -mean_t / std_t  # pixel 0
        self.high = 255.0 * scale + self.low  # pixel 1
        self.per_pixel = 1.0 / std_t  # one pixel unit in input units, per channel
        self.mean, self.std = mean_t, std_t

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def shaped(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A per-channel ``(1, C, 1, 1)`` tensor broadcastable to ``x`` (N×C×H×W or N×C)."""
        return t if x.dim() == 4 else t.view(1, -1)


def input_gradient(circuit: Circuit, x: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
    """``∂ loss(circuit(x), y) / ∂x`` by true backprop through the forward weights, whatever the
    circuit's rules; ``.grad`` of no parameter is touched."""
    with circuit.backprop_truth(), torch.enable_grad():
        x = x.detach().requires_grad_(True)
        loss = loss_fn(circuit(x).float(), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def perturb(circuit: Circuit, x: torch.Tensor, y: torch.Tensor, loss_fn, attack: Attack, eps: float,
            space: PixelSpace, generator: torch.Generator | None = None) -> torch.Tensor:
    """The adversarial batch (in the circuit's input space) for ``x`` at strength ``eps``: within
    ``eps`` of ``x`` in pixel units, channel by channel, and inside the valid pixel range."""
    x = x.detach()
    if eps == 0:
        return x.clone()
    unit = space.shaped(space.per_pixel, x)
    radius = eps * unit
    # The valid range, widened where a clean value lies a rounding error outside it: the clean
    # image itself is always allowed, so eps 0 leaves it exactly as it is.
    lo = torch.maximum(x - radius, torch.minimum(space.shaped(space.low, x), x))
    hi = torch.minimum(x + radius, torch.maximum(space.shaped(space.high, x), x))
    step = attack.step(eps) * unit
    adv = x
    if attack.kind == "pgd" and attack.random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        adv = torch.minimum(torch.maximum(x + noise * radius, lo), hi)
    for _ in range(attack.steps if attack.kind == "pgd" else 1):
        adv = adv + step * input_gradient(circuit, adv, y, loss_fn).sign()
        adv = torch.minimum(torch.maximum(adv, lo), hi)
    return adv.detach()


@torch.no_grad()
def _score(circuit, x, y, loss_fn) -> torch.Tensor:
    out = circuit(x).float()
    return torch.stack([loss_fn(out, y).double() * y.shape[0], (out.argmax(1) == y).sum().double()])


def robustness(circuit: Circuit, stream, loss_fn, attack: Attack, eps: Sequence[float], mean: Sequence[float],
               std: Sequence[float]) -> dict:
    """Top-1 (percent) and loss of ``circuit`` over every batch of ``stream``, clean and under
    ``attack`` at each strength of ``eps`` (pixel units), in eval mode; nothing of the circuit
    changes. ``{"images", "clean": {"top1", "loss"}, "eps": [{"eps", "top1", "loss"}, …]}``."""
    device = stream.device
    space = PixelSpace(mean, std, device)
    generator = torch.Generator(device=device).manual_seed(attack.seed) if attack.random_start else None
    previous = circuit.mode
    circuit.set_mode("eval")
    sums = torch.zeros(1 + len(eps), 2, dtype=torch.float64, device=device)
    images = 0
    try:
        for x, y in stream.epoch(0):
            sums[0] += _score(circuit, x, y, loss_fn)
            for i, e in enumerate(eps, start=1):
                sums[i] += _score(circuit, perturb(circuit, x, y, loss_fn, attack, e, space, generator), y, loss_fn)
            images += y.shape[0]
    finally:
        circuit.set_mode(previous)
    if images == 0:
        raise UserError("the evaluation split is empty; hold out some images (e.g. --val-per-class 50)")
    rows = [{"loss": loss / images, "top1": 100 * hits / images} for loss, hits in sums.tolist()]
    return {"images": images, "clean": rows[0], "eps": [{"eps": e, **r} for e, r in zip(eps, rows[1:])]}


# -- robustness.json -------------------------------------------------------------------------------

def read_robustness(path: Path) -> list[dict]:
    """The results held in a ``robustness.json`` (none when there is no file); a damaged one is a
    ``UserError`` that says how to go on."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {describe_os_error(e)}") from None
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("results"), list):
        raise UserError(f"{path} is not a robustness file of this version (damaged?); move it away and evaluate "
                        f"again")
    return [r for r in data["results"] if isinstance(r, dict)]


def _same_setting(a: dict, b: dict) -> bool:
    keys = ("checkpoint", "data", "split", "attack", "steps", "step_size", "random_start", "seed")
    return all(a.get(k) == b.get(k) for k in keys)


def write_robustness(path: Path, result: dict) -> None:
    """Add ``result`` to the ``robustness.json`` at ``path``, atomically: it replaces a result of
    the same checkpoint, data, split and attack settings, and any of that checkpoint from another
    epoch (the checkpoint has moved on since)."""
    kept = [r for r in read_robustness(path) if not _same_setting(r, result)
            and not (r.get("checkpoint") == result["checkpoint"] and r.get("epoch") != result["epoch"])]
    text = json.dumps({"format": FORMAT, "results": [*kept, result]}, indent=2) + "\n"
    write_atomic(path, text.encode(), what="robustness result")
