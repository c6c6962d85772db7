"""On real data (scikit-learn's digits) KP and WM align their feedback from local signals alone."""

import pytest
import torch

from neurosim.data import load_dataset
from neurosim.training.config import preset
from neurosim.training.run import Run, build_circuit


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """Each digits preset trained once (quiet, in-process), with per-step checks recorded."""
    out = {}
    for rule in ("bp", "fa", "ss", "wm", "kp"):
        cfg = preset(f"{rule}_mlp_digits", monitor_every=0)  # monitors are tested on their own
        run = Run(cfg, tmp_path_factory.mktemp(rule), data=digits, quiet=True)
        initial = {n: (s.weight.detach().clone(), None if s.feedback is None else s.feedback.detach().clone())
                   for n, s in run.circuit.synapses.items()}
        first_angles = run.circuit.alignment_angles()
        violations = []

        def check(r, initial=initial, violations=violations):
            if r.cfg.rule == "usf":  # ss_mlp_digits trains usf (ss is its alias)
                for n, s in r.circuit.synapses.items():
                    if not torch.equal(s.feedback_matrix(), torch.sign(s.weight) * s.feedback):
                        violations.append((r.step, n))
            if r.cfg.rule == "fa":
                for n, s in r.circuit.synapses.items():
                    if not torch.equal(s.feedback, initial[n][1]):
                        violations.append((r.step, n))

        m = run.train(on_step=check)
        out[rule] = dict(run=run, metrics=m, first=first_angles, initial=initial, violations=violations)
    return out


@pytest.mark.slow
def test_kolen_pollack_aligns_from_near_orthogonal(trained):
    t = trained["kp"]
    assert all(75 < a < 105 for a in t["first"].values()), t["first"]  # independent draws
    assert all(a < 5 for a in t["metrics"]["angles"].values()), t["metrics"]["angles"]


def test_weight_mirror_aligns_in_sleep_without_data(digits):
    cfg = preset("wm_mlp_digits")
    circuit = build_circuit(cfg, digits.image_shape, digits.num_classes)
    before = circuit.alignment_angles()
    assert all(a > 75 for a in before.values())
    opt = torch.optim.SGD(circuit.sleep_parameters(), lr=cfg.wm_lr)
    g = torch.Generator().manual_seed(0)
    weights = {n: s.weight.detach().clone() for n, s in circuit.synapses.items()}
    for _ in range(30):  # sleep only: noise in, no data anywhere
        opt.zero_grad()
        circuit.sleep(cfg.wm_sleep_batch_size, g)
        opt.step()
    after = circuit.alignment_angles()
    assert all(a < 20 for a in after.values()), after
    for n, s in circuit.synapses.items():
        assert torch.equal(s.weight, weights[n])  # sleep leaves forward weights alone


@pytest.mark.slow
def test_weight_mirror_stays_aligned_through_training(trained):
    assert all(a < 20 for a in trained["wm"]["metrics"]["angles"].values())


@pytest.mark.slow
def test_feedback_alignment_never_changes_b(trained):
    t = trained["fa"]
    assert t["violations"] == []
    assert t["run"].step > 0


@pytest.mark.slow
def test_sign_symmetry_is_sign_of_w_at_every_step(trained):
    t = trained["ss"]
    assert t["violations"] == []
    # and W did change, so the check had something to follow
    n, s = next(iter(t["run"].circuit.synapses.items()))
    assert not torch.equal(s.weight, t["initial"][n][0])


@pytest.mark.slow
def test_every_rule_learns_and_kp_wm_match_bp(trained):
    acc = {r: t["metrics"]["test_acc"] for r, t in trained.items()}
    assert all(a > 80 for a in acc.values()), acc  # chance is 10 %
    assert acc["kp"] > acc["bp"] - 3 and acc["wm"] > acc["bp"] - 3, acc
