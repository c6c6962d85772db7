"""Multilayer perceptron circuits."""

from __future__ import annotations

from neurosim.core.circuit import Circuit
from neurosim.rules.base import PlasticityRule


def build_mlp(rule: PlasticityRule, in_shape, hidden, num_classes: int, activation: str = "relu",
              init: str = "default", seed: int = 0, bias: bool = True) -> Circuit:
    """``input → hidden[0] → … → output``, every pathway a dense plastic synapse under ``rule``.

    ``bias`` False: no synapse has a bias (a ReLU neuron then rests at 0 without input).
    Populations are named ``x``, ``h1``, ``h2``, …, ``y``; the output population is linear
    (its activity is the logits). A rule with ``direct_feedback`` (DFA) also gets a feedback
    pathway from ``y`` to every hidden population.
    """
    c = Circuit(rule=rule, seed=seed)
    c.input("x", in_shape)
    pre = "x"
    for i, width in enumerate(hidden, start=1):
        c.population(f"h{i}", width, activation=activation)
        c.dense(pre, f"h{i}", init=init, bias=bias)
        pre = f"h{i}"
    c.population("y", num_classes)
    c.dense(pre, "y", init=init, bias=bias)
    if rule.direct_feedback:
        c.add_direct_feedback()  # the output error straight to every synapse's post population
    return c
