"""Adversarial robustness (``evaluate.py RUN --attack fgsm|pgd --eps ...``): the attacks' bounds in
pixel units, their gradients (backprop's, whatever rule trained the circuit), their strength on a
trained digits run, nothing of the circuit changed, the file the study's report reads, and one
clear message for bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from neurosim.models.mlp import build_mlp
from neurosim.rules.backprop import Backprop
from neurosim.rules.feedback_alignment import FeedbackAlignment
from neurosim.tools.cli import evaluate, main
from neurosim.tools.study import RuleResult
from neurosim.tools.study.report import _robustness_lines
from neurosim.training.attack import Attack, PixelSpace, input_gradient, parse_eps, perturb, robustness

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(root: Path, name: str, epochs: int) -> Path:
    from neurosim.training.config import preset
    from neurosim.training.run_dir import open_run

    run = open_run(root / name, preset(name, epochs=epochs, hidden=(32,), device="cpu", monitor_every=0), quiet=True)
    run.train()
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Digits MLPs trained for a few epochs (about 90 % test top-1): one by backprop, one by FA."""
    root = tmp_path_factory.mktemp("attack")
    return {"bp": trained(root, "bp_mlp_digits", 3), "fa": trained(root, "fa_mlp_digits", 2)}


def loaded(run_dir: Path):
    """The run's best circuit, its test stream and loss, and the data's mean and std."""
    from neurosim.data import BatchStream, load_dataset
    from neurosim.training.checkpoint import load_checkpoint
    from neurosim.training.config import RunConfig
    from neurosim.training.run import build_circuit, loss_function

    state = load_checkpoint(run_dir / "best.pt")
    cfg, data = RunConfig.from_dict(state["config"]), state["data"]
    circuit = build_circuit(cfg, tuple(data["image_shape"]), len(data["classes"]))
    circuit.load_state_dict(state["circuit"])
    test = load_dataset(cfg.data, cfg.data_dir, cfg.val_per_class, (0, 0), torch.device("cpu"), cfg.seed)
    stream = BatchStream(test.test_x, test.test_y, 256, data["mean"], data["std"], shuffle=False, seed=0)
    return circuit, stream, loss_function(cfg.loss), data["mean"], data["std"]


def attacked(run_dir: Path, *args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(evaluate, [str(run_dir), "--device", "cpu", *map(str, args)])
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run_dir.name
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns(".lock", "robustness.json"))
    return dst


def last_result(run_dir: Path) -> dict:
    return json.loads((run_dir / "robustness.json").read_text())["results"][-1]


# -- strength on a trained run ---------------------------------------------------------------------

def test_eps_0_is_clean_accuracy_and_pgd_is_monotone_and_stronger_than_fgsm(runs, tmp_path, capsys):
    run = copy(runs["bp"], tmp_path)
    code, out, err = attacked(run, "--attack", "fgsm", "--eps", "0,16/255,0.125", capsys=capsys)
    assert code == 0, err
    fgsm = last_result(run)
    assert fgsm["eps"][0]["top1"] == fgsm["clean"]["top1"] and fgsm["eps"][0]["loss"] == fgsm["clean"]["loss"]
    assert fgsm["clean"]["top1"] > 85 and fgsm["gradient"] == "backprop"
    assert "true backprop" in out and "0 (clean)" in out and "16/255" in out
    # the clean accuracy is the plain evaluation's
    assert attacked(run, "--json", tmp_path / "clean.json", capsys=capsys)[0] == 0
    assert json.loads((tmp_path / "clean.json").read_text())["top1"] == fgsm["clean"]["top1"]

    code, _, err = attacked(run, "--attack", "pgd", "--eps", "0,4/255,16/255,0.125,0.25", capsys=capsys)
    assert code == 0, err
    pgd = last_result(run)
    top1 = [pgd["clean"]["top1"], *(row["top1"] for row in pgd["eps"])]
    assert top1 == sorted(top1, reverse=True) and top1[-1] < top1[0] - 50, top1
    assert pgd["eps"][0]["top1"] == pgd["clean"]["top1"]
    fgsm_at = {row["eps_text"]: row["top1"] for row in fgsm["eps"]}
    pgd_at = {row["eps_text"]: row["top1"] for row in pgd["eps"]}
    for eps in ("16/255", "0.125"):
        assert pgd_at[eps] <= fgsm_at[eps], (eps, pgd_at, fgsm_at)
    # both kept in robustness.json, beside each other; the same attack again replaces its own
    assert attacked(run, "--attack", "fgsm", "--eps", "8/255", capsys=capsys)[0] == 0
    results = json.loads((run / "robustness.json").read_text())["results"]
    assert [(r["attack"], [e["eps_text"] for e in r["eps"]]) for r in results] == [
        ("pgd", ["0", "4/255", "16/255", "0.125", "0.25"]), ("fgsm", ["8/255"])]
    assert not list(run.glob("*.tmp"))


def test_the_study_report_shows_a_robustness_column(runs, tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    run = copy(runs["bp"], study)
    (study / "bp").symlink_to(run.name)
    assert _robustness_lines(study, [RuleResult("bp", "done", 3, [], None)]) == []
    assert attacked(run, "--attack", "pgd", "--eps", "8/255", "--steps", "3", capsys=capsys)[0] == 0
    lines = _robustness_lines(study, [RuleResult("bp", "done", 3, [], None)])
    head = next(line for line in lines if line.startswith("| rule"))
    row = next(line for line in lines if line.startswith("| **bp**"))
    assert "| clean | PGD-3 8/255 |" in head
    result = last_result(run)
    assert f"| {result['clean']['top1']:.2f} | {result['eps'][0]['top1']:.2f} |" in row


# -- the perturbation ------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", [Attack("fgsm"), Attack("pgd", 5), Attack("pgd", 4, 3 / 255, True, 7)])
def test_perturbation_stays_in_the_eps_ball_and_the_pixel_range_per_channel(attack):
    # Three channels with different means and spreads: eps and the range convert per channel.
    mean, std = (0.2, 0.5, 0.9), (0.1, 0.3, 0.05)
    torch.manual_seed(0)
    circuit = build_mlp(Backprop(), (3, 4, 4), (16,), 5).set_mode("eval")
    pixels = torch.rand(64, 3, 4, 4)
    pixels[:8] = 0.0  # images at the edges of the range
    pixels[8:16] = 1.0
    space = PixelSpace(mean, std, "cpu")
    x = (pixels - space.mean) / space.std
    y = torch.randint(0, 5, (64,))
    eps = 8 / 255
    adv = perturb(circuit, x, y, F.cross_entropy, attack, eps, space, torch.Generator().manual_seed(attack.seed))
    moved = space.to_pixels(adv)
    change = (moved - pixels).abs()
    assert change.max() <= eps + 1e-6
    assert moved.min() >= -1e-6 and moved.max() <= 1 + 1e-6
    assert change.amax((0, 2, 3)).min() >= eps - 1e-6  # every channel moved the whole eps somewhere
    if attack.kind == "fgsm":  # one full step, cut only at the range's edges
        inside = (pixels > eps) & (pixels < 1 - eps)
        assert torch.allclose(change[inside], torch.full_like(change[inside], eps), atol=1e-6)
    assert torch.equal(perturb(circuit, x, y, F.cross_entropy, attack, 0.0, space), x)


def test_random_start_is_seeded(runs):
    circuit, stream, loss_fn, mean, std = loaded(runs["bp"])
    attack = Attack("pgd", 2, None, True, 3)
    first = robustness(circuit, stream, loss_fn, attack, [16 / 255], mean, std)
    assert robustness(circuit, stream, loss_fn, attack, [16 / 255], mean, std) == first


# -- gradients and side effects --------------------------------------------------------------------

def test_attack_gradients_are_backprops_even_for_an_fa_trained_run(runs):
    circuit, stream, loss_fn, _, _ = loaded(runs["fa"])
    circuit.set_mode("eval")
    x, y = next(iter(stream.epoch(0)))
    assert all(isinstance(s.rule, FeedbackAlignment) for s in circuit.synapses.values())
    grad = input_gradient(circuit, x, y, loss_fn)
    # a plain autograd pass through the same weights, no circuit involved
    plain = x.clone().requires_grad_(True)
    h = plain.flatten(1)
    for name in ("x->h1", "h1->y"):
        syn = circuit.synapses[name]
        h = F.linear(h, syn.weight, syn.bias)
        if name != "h1->y":
            h = F.relu(h)
    (truth,) = torch.autograd.grad(loss_fn(h, y), plain)
    torch.testing.assert_close(grad, truth, rtol=1e-5, atol=1e-8)
    # what the circuit's own (FA) feedback sends back to its input is another vector
    own = x.clone().requires_grad_(True)
    (fa,) = torch.autograd.grad(loss_fn(circuit(own), y), own)
    assert not torch.allclose(fa, truth, rtol=1e-2, atol=1e-6)
    assert all(isinstance(s.rule, FeedbackAlignment) for s in circuit.synapses.values())  # restored


def test_attacking_changes_nothing_in_the_circuit(runs):
    circuit, stream, loss_fn, mean, std = loaded(runs["fa"])
    circuit.set_mode("engaged")
    before = {k: v.clone() for k, v in circuit.state_dict().items()}
    result = robustness(circuit, stream, loss_fn, Attack("pgd", 3, None, True, 0), [0.0, 8 / 255], mean, std)
    assert result["images"] == len(stream.y) and result["eps"][0]["top1"] == result["clean"]["top1"]
    after = circuit.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in circuit.parameters())
    assert circuit.mode == "engaged" and circuit.training
    rules = {type(s.rule) for s in circuit.synapses.values()}
    assert rules == {FeedbackAlignment}


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--attack", "pgd"], "--attack pgd needs --eps"),
    (["--eps", "8/255"], "--eps applies with --attack only"),
    (["--steps", "5"], "--steps applies with --attack only"),
    (["--attack", "cw", "--eps", "8/255"], "--attack must be fgsm or pgd, not 'cw'"),
    (["--attack", "pgd", "--eps"], "option --eps needs a value"),
    (["--attack", "pgd", "--eps", "-1/255"], "it must be from 0 to 1"),
    (["--attack", "pgd", "--eps", "2"], "it must be from 0 to 1"),
    (["--attack", "pgd", "--eps", "abc"], "bad value 'abc' for --eps"),
    (["--attack", "pgd", "--eps", "1/0"], "bad value '1/0' for --eps"),
    (["--attack", "pgd", "--eps", "nan"], "bad value 'nan' for --eps"),
    (["--attack", "pgd", "--eps", "2/255,,4/255"], "separated by commas"),
    (["--attack", "pgd", "--eps", "8/255,8/255"], "gives 8/255 twice"),
    (["--attack", "fgsm", "--eps", "8/255", "--steps", "5"], "--steps applies to --attack pgd only"),
    (["--attack", "fgsm", "--eps", "8/255", "--random-start"], "--random-start applies to --attack pgd only"),
    (["--attack", "pgd", "--eps", "8/255", "--steps", "0"], "bad value '0' for --steps"),
    (["--attack", "pgd", "--eps", "8/255", "--steps", "ten"], "bad value 'ten' for --steps"),
    (["--attack", "pgd", "--eps", "8/255", "--step-size", "0"], "--step-size 0 would never move"),
    (["--attack", "pgd", "--eps", "8/255", "--seed", "3"], "--seed applies with --random-start only"),
    (["--attack", "pgd", "--eps", "8/255", "--random-start", "--random-start"], "given twice"),
    (["--attack", "pgd", "--eps", "8/255", "--random-strat"], "did you mean --random-start?"),
])
def test_bad_attack_options_are_one_message_exit_2_and_nothing_written(runs, tmp_path, capsys, args, message):
    run = copy(runs["bp"], tmp_path)
    files = sorted(p.name for p in run.iterdir())
    code, out, err = attacked(run, *args, capsys=capsys)
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in run.iterdir()) == files and not out


def test_a_damaged_robustness_file_is_refused_before_the_attack(runs, tmp_path, capsys):
    run = copy(runs["bp"], tmp_path)
    (run / "robustness.json").write_text("{not json")
    code, _, err = attacked(run, "--attack", "fgsm", "--eps", "8/255", capsys=capsys)
    assert code == 2 and "robustness.json is not a robustness file" in err and err.count("\n") == 1
    assert (run / "robustness.json").read_text() == "{not json"


def test_eps_accepts_fractions_and_decimals():
    assert parse_eps("2/255, 0.03,0") == (("2/255", 2 / 255), ("0.03", 0.03), ("0", 0.0))


def test_help_says_what_eps_means(capsys):
    code, out, _ = attacked(Path("."), "--help", capsys=capsys)
    assert code == 0
    for words in ("--attack fgsm|pgd", "--eps LIST", "pixel units", "16/255", "true backprop", "--random-start"):
        assert words in out
