"""The command line's conventions: options built from the configuration's fields, grouped and
described, ``--k v`` and ``--k=v``, "did you mean", a help that needs no PyTorch, ``--resume DIR``
alone, ``--config RUN/config.json``, and the ``neurosim`` command."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from neurosim.common.errors import UserError
from neurosim.tools.cli import evaluate, main, parse_run_args, run_circuit, run_usage
from neurosim.tools.cli.options import GROUPS
from neurosim.training.config import RunConfig, preset, rule_settings

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--hidden", "8", "--train-limit", "96", "--monitor-every", "0", "--device", "cpu"]


def in_process(*args, capsys, entry=run_circuit):
    """The command as ``main`` runs it, in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as done:
        main(entry, [str(a) for a in args])
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def help_of(text: str, option: str) -> str:
    """The help of one option in ``--help``'s output: its line and the lines wrapped under it."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(option + " "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" " * 20)), len(lines))
    return " ".join(line.strip() for line in lines[start:end])


# -- help ------------------------------------------------------------------------------------------

def test_help_needs_no_torch():
    """--help, a typo and an unknown preset answer without loading PyTorch (it takes seconds)."""
    probe = ("import sys\n"
             "from neurosim.tools.cli import main, run_circuit\n"
             "for args in ([{args}],):\n"
             "    try:\n"
             "        main({entry}, list(args))\n"
             "    except SystemExit as e:\n"
             "        print('status', e.code, file=sys.stderr)\n"
             "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n")
    cases = [("run_circuit", "'kp_resnet18', '--help'"), ("run_circuit", "'--help'"),
             ("run_circuit", "'kp_resnet18', '--epoch', '3'"), ("run_circuit", "'kp_resnt18'"),
             ("run_circuit", "'kp_resnet18', '--lr', 'fast'"), ("None", "'--help'"), ("None", "'run', '--help'"),
             ("None", "'evaluate', '--help'"), ("None", "'plot', '--help'")]
    for entry, args in cases:
        done = subprocess.run([sys.executable, "-c", probe.format(entry=entry, args=args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        assert re.search(r"status [02]\n", done.stderr), (args, done.stderr)


def test_help_is_grouped_and_shows_the_presets_defaults(capsys):
    code, out, _ = in_process("kp_resnet18", "--help", capsys=capsys)
    assert code == 0
    titles = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert [t.split(" (")[0].rstrip(":") for t in titles] == [g.split(" (")[0] for g in GROUPS.values()]
    assert "Defaults below are those of kp_resnet18." in out
    assert help_of(out, "--epochs").endswith("(default: 200 epochs)")
    assert help_of(out, "--momentum").endswith("(default: 0.9)")
    assert help_of(out, "--data").endswith("(default: cifar100)")
    assert help_of(out, "--milestones").endswith("(default: 60,120,160 epochs)")
    assert "train on the first N training images only" in help_of(out, "--train-limit")
    # the base defaults without a preset
    code, out, _ = in_process("--help", capsys=capsys)
    assert help_of(out, "--epochs").endswith("(default: 10 epochs)") and help_of(out, "--data").endswith(
        "(default: digits)")
    assert help_of(out, "--wm-sleep-every").endswith("(default: 1 steps)")


def test_every_field_has_a_group_and_a_description():
    for f in attrs.fields(RunConfig):
        if f.name not in ("preset", "rule_params"):
            assert f.metadata.get("group") in GROUPS and f.metadata.get("group") != "rule", f.name
            assert f.metadata.get("help") and "\n" not in f.metadata["help"], f.name
    for key, (_, f) in rule_settings().items():
        assert f.metadata.get("help"), f"{key}: give its attrs field metadata={{'help': ...}}"


# -- parsing ---------------------------------------------------------------------------------------

def test_equals_form_underscores_switches_and_negative_values():
    request = parse_run_args(["kp_mlp_digits", "--epochs=3", "--lr", "0.05", "--hidden=8,4", "--batch_size", "16",
                              "--flip", "--shuffle=false", "--wm-sleep-before", "-1", "--out=x"])
    assert request.preset == "kp_mlp_digits" and request.out == Path("x")
    assert request.overrides == dict(epochs=3, lr=0.05, hidden=(8, 4), batch_size=16, flip=True, shuffle=False,
                                     wm_sleep_before=-1)
    for args in (["--momentum", "-inf"], ["--momentum=-inf"]):
        with pytest.raises(UserError, match="bad value '-inf' for --momentum: expected a finite number"):
            parse_run_args(["kp_mlp_digits", *args])


@pytest.mark.parametrize("args, message", [
    (["kp_mlp_digits", "--epoch", "3"], "unknown option --epoch; did you mean --epochs?"),
    (["kp_mlp_digits", "--epoch=3"], "unknown option --epoch; did you mean --epochs?"),
    (["kp_mlp_digits", "--kp-decy", "0.1"], "unknown option --kp-decy; did you mean --kp-decay?"),
    (["kp_resnt18"], "unknown preset 'kp_resnt18'; did you mean kp_resnet18?"),
    (["kp_resnt18", "--help"], "unknown preset 'kp_resnt18'; did you mean kp_resnet18?"),
    (["kp_mlp_digits", "--amp", "bf-16"], "bad value 'bf-16' for --amp: expected auto, off or bf16; did you mean bf16?"),
    (["kp_mlp_digits", "--quiet", "--verbose"], "--verbose and --quiet cannot go together"),
    (["kp_mlp_digits", "--quiet=yes"], "option --quiet takes no value"),
    (["kp_mlp_digits", "--out", ""], "option --out needs a directory"),
    (["kp_mlp_digits", "stray"], "unexpected argument 'stray'"),
    (["kp_mlp_digits", "--config", "x/config.json"], "give a preset or --config, not both"),
    (["--config", "x", "--resume", "y"], "--config and --resume cannot go together"),
])
def test_mistakes_are_one_line_with_a_suggestion(args, message, capsys):
    code, out, err = in_process(*args, capsys=capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_unknown_preset_is_one_line_that_says_how_names_are_made(capsys):
    code, _, err = in_process("nope", capsys=capsys)
    assert code == 2 and err.count("\n") == 1
    assert "a preset is <rule>_<model>" in err.lower() and "kp_mlp_digits" in err and "did you mean" not in err


# -- --resume DIR alone, --config RUN/config.json ---------------------------------------------------

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A one-epoch run of a tiny digits MLP, made through the command line."""
    out = tmp_path_factory.mktemp("cli") / "run"
    with pytest.raises(SystemExit) as done:
        main(run_circuit, ["kp_mlp_digits", *TINY, "--quiet", "--out", str(out)])
    assert done.value.code == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def test_resume_needs_only_the_directory(digits_run, tmp_path, capsys):
    run = copy_of(digits_run, tmp_path)
    code, _, err = in_process("--resume", run, "--epochs", "2", "--quiet", capsys=capsys)
    assert code == 0, err
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    # a preset that is not the run's is refused, and a setting that cannot change
    code, _, err = in_process("bp_mlp_digits", "--resume", run, "--epochs", "3", capsys=capsys)
    assert code == 2 and "holds a kp_mlp_digits run, not bp_mlp_digits" in err
    code, _, err = in_process("--resume", run, "--lr", "0.5", capsys=capsys)
    assert code == 2 and "--lr cannot change when resuming" in err
    code, _, err = in_process("--resume", run, "--epochs", "0", capsys=capsys)
    assert code == 2 and "epochs must be positive" in err
    code, _, err = in_process("--resume", tmp_path / "nothing", capsys=capsys)
    assert code == 2 and "no checkpoint" in err


def test_config_starts_a_new_run_with_the_same_settings(digits_run, tmp_path, capsys):
    saved = json.loads((digits_run / "config.json").read_text())
    for source in (digits_run / "config.json", digits_run):  # the file, or the run directory
        out = tmp_path / f"again-{source.name}"
        code, _, err = in_process("--config", source, "--seed", "1", "--quiet", "--out", out, capsys=capsys)
        assert code == 0, err
        again = json.loads((out / "config.json").read_text())
        assert again == {**saved, "seed": 1}
        assert (out / "last.pt").exists()
    code, _, err = in_process("--config", digits_run, "--rule", "fa", capsys=capsys)
    assert code == 2 and "use the preset fa_mlp_digits instead" in err
    code, _, err = in_process("--config", digits_run, "--wm-lr", "0.1", capsys=capsys)
    assert code == 2 and "--wm-lr applies to the wm rule only" in err


def test_config_of_an_older_version_still_loads(tmp_path, capsys):
    old = preset("wm_mlp_digits", hidden=(8,), epochs=1, train_limit=96, monitor_every=0, device="cpu").to_dict()
    old.pop("rule_params")  # written before rules declared their settings
    old.update(wm_lr=0.2, sleep_before=2, sleep_batch_size=16)
    (tmp_path / "config.json").write_text(json.dumps(old))
    code, _, err = in_process("--config", tmp_path / "config.json", "--quiet", "--out", tmp_path / "run",
                              capsys=capsys)
    assert code == 0, err
    params = json.loads((tmp_path / "run" / "config.json").read_text())["rule_params"]
    assert params["lr"] == 0.2 and params["sleep_before"] == 2 and params["sleep_batch_size"] == 16


@pytest.mark.parametrize("contents, message", [
    (None, "no configuration"),
    ("{not json", "is not a configuration (not JSON"),
    ("[1, 2]", "is not a configuration"),
    ('{"colour": "red"}', "unknown fields ['colour']"),
    ('{"epochs": 0}', "holds an invalid setting: epochs must be positive"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, contents, message):
    path = tmp_path / "config.json"
    if contents is not None:
        path.write_text(contents)
    code, _, err = in_process("--config", path, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_evaluate_takes_equals_and_suggests_options(digits_run, tmp_path, capsys):
    result = tmp_path / "e.json"
    code, out, err = in_process(digits_run, f"--json={result}", "--split=test", capsys=capsys, entry=evaluate)
    assert code == 0 and json.loads(result.read_text())["split"] == "test", err
    code, _, err = in_process(digits_run, "--jsn", "x", capsys=capsys, entry=evaluate)
    assert code == 2 and err.count("\n") == 1 and "unknown option --jsn; did you mean --json?" in err


# -- the neurosim command ----------------------------------------------------------------------------

def test_neurosim_command_names_its_subcommands(capsys):
    code, out, _ = in_process("--help", capsys=capsys, entry=None)
    assert code == 0 and all(f"  {name} " in out for name in ("run", "evaluate", "plot", "compare"))
    code, _, err = in_process("rn", capsys=capsys, entry=None)
    assert code == 2 and "unknown command 'rn'; did you mean run?" in err
    code, out, _ = in_process("run", "kp_mlp_digits", "--help", capsys=capsys, entry=None)
    assert code == 0 and out.startswith("usage: neurosim run PRESET") and "those of kp_mlp_digits" in out
    code, out, _ = in_process("evaluate", "--help", capsys=capsys, entry=None)
    assert code == 0 and out.startswith("usage: neurosim evaluate RUN_DIR")
    code, out, _ = in_process("compare", "--help", capsys=capsys, entry=None)
    assert code == 0 and out.startswith("usage: neurosim compare MODEL") and "compare_rules.py --resume" not in out


def test_python_m_neurosim_and_the_console_script(tmp_path):
    commands = [[sys.executable, "-m", "neurosim"]]
    if shutil.which("neurosim"):  # installed by pip install -e . (setup.cfg's console_scripts)
        commands.append([shutil.which("neurosim")])
    for command in commands:
        done = subprocess.run([*command, "run", "kp_mlp_digits", *TINY, "--quiet", "--out", str(tmp_path / "r")],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and done.stdout == done.stderr == "", done.stderr[-2000:]
        shutil.rmtree(tmp_path / "r")
        done = subprocess.run([*command, "run", "--epoch", "3"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_run_usage_lists_every_rule_without_a_preset():
    text = run_usage()
    assert all(f"--{key.replace('_', '-')} " in text for key in rule_settings())
