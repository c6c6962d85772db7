"""Phaseless alignment learning on digits: what its feedback weight's noise does to training.

PAL's ``B`` is an estimate, from the noise of one presentation at a time, of its expected value
``E[f'_post W f'_pre]``. This trains the digits MLP (64-128-64-10, ReLU) in time with the
``pal_mlp_digits`` settings (20 steps per stimulus, noise 0.5, plain SGD, batch 32) but at
lr 0.2, where that preset's loss spiked (it trains at 0.1), with one of these feedback weights
for the hidden synapses:

- ``pal``: the rule's own update (``neurosim.rules.phaseless``);
- ``target``: no estimate: after every step ``B`` relaxes toward ``W ∘ P`` by the factor
  ``lr·rate·decay`` = 0.2 with which PAL's ``B`` relaxes under plain SGD (the same lag), ``P``
  the co-activation rate of the post and pre units on the batch (their noisy drives above 0,
  over 8 noise draws): the expected PAL update, without its sampling error;
- ``target-noise``: the same plus fresh Gaussian noise of ``--noise-size`` times the target's
  root mean square in every element at every step: a sampling error as large as PAL's but
  independent of the circuit's signals;
- ``pal-independent``: PAL's own estimate, formed on the same batch from a second presentation
  with noise drawn independently of the one ``W`` learns from (a copy of the circuit presents
  it): PAL's sampling error, uncorrelated with ``W``'s update.

It prints per epoch the largest loss of a batch (at the stimulus's last step), the test top-1
(instantaneous, noiseless) and the angles of ``B`` to ``W`` and to its expected value ``W ∘ P``
(on the test images). ``python experiments/pal_vs_sleep.py --feedback target``; the command line
comparison with the weight mirror's sleep is ``experiments/run_circuit.py`` (docs/results.md).
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F

from neurosim.core.dynamics import TimeSettings, time_backward
from neurosim.models.mlp import build_mlp
from neurosim.rules.phaseless import PhaselessAlignment

HIDDEN = ("h1->h2", "h2->y")


def digits(seed: int = 0):
    """sklearn's digits, a stratified 20 % test split, standardised with the training images' mean and std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr_x, te_x, tr_y, te_y = train_test_split(d.images.reshape(-1, 64), d.target, test_size=0.2,
                                              stratify=d.target, random_state=seed)
    mean, std = tr_x.mean(), tr_x.std()
    return [torch.tensor(a, dtype=torch.float32) for a in ((tr_x - mean) / std, (te_x - mean) / std)] + \
        [torch.tensor(tr_y), torch.tensor(te_y)]


@torch.no_grad()
def expected_feedback(c, x, noise: float, generator, draws: int = 8) -> dict[str, torch.Tensor]:
    """``W ∘ P`` for the hidden synapses: ``P`` the rate at which post and pre units are active
    together (``f' = 1`` for the linear output) on ``x`` under the intrinsic noise."""
    slope, act = {}, {"x": x.expand(draws, *x.shape)}
    for name in c.order()[1:]:
        ((syn, pre),) = c.incoming(name)
        u = torch.einsum("oi,sni->sno", syn.weight, act[pre]) + syn.bias
        u = u + noise * torch.randn(u.shape, generator=generator)
        relu = c.populations[name].activation == "relu"
        slope[name] = (u > 0).float() if relu else torch.ones_like(u)
        act[name] = u.clamp(min=0) if relu else u
    out = {}
    for n in HIDDEN:
        s = c.synapses[n]
        p = torch.einsum("sno,sni->oi", slope[s.post], slope[s.pre]) / (draws * x.shape[0])
        out[n] = s.weight * p
    return out


def angle(a, b) -> float:
    a, b = a.flatten(), b.flatten()
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--feedback", choices=("pal", "target", "target-noise", "pal-independent"), default="pal")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--noise-size", type=float, default=1.0, help="target-noise: noise per element and step, "
                                                                  "in units of the target's root mean square")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    tr_x, te_x, tr_y, te_y = digits()
    rule = PhaselessAlignment()
    c = build_mlp(rule, 64, (128, 64), 10, "relu", seed=args.seed)
    lr, noise, k = 0.2, 0.5, 0.2 * rule.rate * rule.decay
    opt = torch.optim.SGD(c.engaged_parameters(), lr=lr, momentum=0.0)
    settings = TimeSettings(duration=20, noise=noise)
    g, order, probe, second = (torch.Generator().manual_seed(args.seed + i) for i in (1, 2, 3, 4))
    print("epoch  max batch loss  test top-1  " + "  ".join(f"{n} B∠W  B∠E[B]" for n in HIDDEN))
    for epoch in range(1, args.epochs + 1):
        worst, perm = 0.0, torch.randperm(len(tr_x), generator=order)
        for i in range(0, len(tr_x), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss = time_backward(c, tr_x[idx], lambda out, t=tr_y[idx]: F.cross_entropy(out, t), settings,
                                 generator=g)
            worst = max(worst, float(loss))
            if args.feedback == "pal-independent":
                twin = copy.deepcopy(c)
                twin.zero_grad(set_to_none=True)
                time_backward(twin, tr_x[idx], lambda out, t=tr_y[idx]: F.cross_entropy(out, t), settings,
                              generator=second)
                for n in HIDDEN:
                    c.synapses[n].feedback.grad = twin.synapses[n].feedback.grad
            elif args.feedback != "pal":
                for n in HIDDEN:
                    c.synapses[n].feedback.grad = None  # the optimizer leaves B alone; it is set below
            opt.step()
            if args.feedback.startswith("target"):
                target = expected_feedback(c, tr_x[idx], noise, g)
                with torch.no_grad():
                    for n, t in target.items():
                        if args.feedback == "target-noise":
                            t = t + args.noise_size * t.pow(2).mean().sqrt() * torch.randn(t.shape, generator=g)
                        c.synapses[n].feedback.add_(k * (t - c.synapses[n].feedback))
        with torch.no_grad():
            acc = float((c(te_x).argmax(1) == te_y).float().mean())
            expected = expected_feedback(c, te_x, noise, probe)
            cells = [f"{angle(c.synapses[n].feedback, c.synapses[n].weight):5.1f}°  "
                     f"{angle(c.synapses[n].feedback, expected[n]):5.1f}°" for n in HIDDEN]
        print(f"{epoch:5d}  {worst:14.2f}  {100 * acc:9.2f} %  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
