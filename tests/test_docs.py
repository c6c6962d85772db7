"""Every fenced block of README.md and docs/*.md runs as written, or says why it does not.

A block runs here unless the line right before it (blank lines aside) is an HTML comment
``<!-- illustration: why -->`` (a diagram, a formula, a GPU job, hours of training, set-up).
``python`` blocks are executed; other blocks are shell commands, run one after another from a
scratch directory. What the test changes to run them on a CPU in seconds to minutes is declared
below and nothing else: the paths (``SUBSTITUTIONS``), the short budget appended to training
commands (``BUDGET``, ``STUDY_RULES``, ``RESNET_BUDGET``, ``WM_BUDGET``), and the runs that stand
for a placeholder ``runs/<preset>-…`` (``PLACEHOLDER_SETTINGS``). A command the test has no way
to run fails the test until its block is marked.

The quick suite checks the marking, executes the python blocks, and checks every training
command's preset and options, illustrations included, as its program does before it trains.
Running the shell commands takes minutes (each starts processes that train and draw) and is
slow: ``pytest --runslow tests/test_docs.py``. Commands that read ``../shared/data`` skip where
it is absent.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*illustration:\s*(\S.*?)\s*-->$")
PLACEHOLDER_RUN = re.compile(r"runs/([a-z0-9_]+)-…")

# What the test puts in place of a word of a command (or of a python block) before running it.
SUBSTITUTIONS = {
    "../shared/data": str(SHARED_DATA),  # the commands are written from the repository root
    "<rule>": "kp",  # "<rule>_mlp_digits": one rule stands for all
}
# Words that stand for a value the reader chooses, in commands that are not run.
OPTION_PLACEHOLDERS = {"N": "1"}
PROGRAMS = {"python": [sys.executable], "python3": [sys.executable],
            "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
SCRIPTS = ("experiments/",)  # benchmarks time minutes of work; their own tests run them small

# The short budget appended to training commands (in place of the command's own value of an option).
BUDGET = {
    "run_circuit.py": ["--epochs", "1", "--train-limit", "64", "--quiet"],
    "compare_rules.py": ["--epochs", "1", "--train-limit", "64", "--quiet", "--in-process"],
}
STUDY_RULES = 2  # a study trains the first two of its rules
RESNET_BUDGET = ["--width", "0.125"]  # the CIFAR ResNets at an eighth of their width
WM_BUDGET = ["--wm-sleep-before", "1"]  # one mirror batch before training, not the preset's 200
# The run that stands for ``runs/<preset>-…``: one short epoch on synthetic images.
PLACEHOLDER_SETTINGS = dict(data="synthetic", epochs=1, train_limit=64, synthetic_test=64, device="cpu")
PLACEHOLDER_WM_SETTINGS = dict(wm_sleep_before=1)
TIMEOUT_S = 900


@attrs.frozen
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    info: str  # the fence's info string: "python", "bash", ""
    text: str
    illustration: str | None  # why it does not run, from its marker

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def commands(self) -> list[list[str]]:
        """The shell commands of the block, as words (continuation lines joined, comments dropped)."""
        joined = re.sub(r"\\\n\s*", " ", self.text)
        return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]

    @property
    def needs_data(self) -> bool:
        return "../shared/data" in self.text


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, each with the reason of its illustration marker."""
    out, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(```+)(.*)$", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence[1])), None)
        assert end is not None, f"{path.relative_to(ROOT)}:{i + 1}: a fenced block is not closed"
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        out.append(Block(path, i + 1, fence[2].strip(), "\n".join(lines[i + 1:end]) + "\n",
                         marker[1] if marker else None))
        i = end + 1
    return out


ALL = [b for path in DOCUMENTS for b in blocks(path)]


def _runnable(block: Block) -> list[str]:
    """Why the test cannot run each command of a shell block (empty: it can run them all)."""
    problems = []
    for words in block.commands:
        program = words[0]
        script = next((w for w in words[1:] if w.startswith(SCRIPTS)), None)
        if program not in PROGRAMS or (script is None and words[1:2] != ["-c"]):
            problems.append(f"`{shlex.join(words)}`: the test runs python or torchrun with a script of "
                            f"experiments/, and python -c")
    return problems


def test_the_documents_have_blocks():
    assert {b.path.name for b in ALL} >= {"README.md", "design.md", "results.md", "monitors.md"}
    assert all(b.text.strip() for b in ALL), [b.name for b in ALL if not b.text.strip()]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_block_runs_here_or_is_marked_as_an_illustration(path):
    unmarked = [f"{b.name}: {_runnable(b)[0]}" for b in ALL
                if b.path == path and b.illustration is None and b.info != "python" and _runnable(b)]
    assert not unmarked, ("blocks the docs test cannot run; make them runnable or put "
                          "<!-- illustration: why --> right before them:\n" + "\n".join(unmarked))


def _preset_of(words: list[str]) -> str | None:
    script = next((w for w in words if w.endswith("run_circuit.py")), None)
    return words[words.index(script) + 1] if script and words.index(script) + 1 < len(words) else None


def _check_options(words: list[str], monkeypatch) -> None:
    """A training command's options, checked as its program checks them before it loads data
    (the device and the data it names need not be present here)."""
    import neurosim.tools.cli
    import neurosim.tools.study.plan
    from neurosim.tools.study import parse_request, plan_study

    monkeypatch.setattr(neurosim.tools.cli, "check_device", lambda spec: None)
    monkeypatch.setattr(neurosim.tools.study.plan, "_check_data", lambda spec, data_dir: None)

    words = [OPTION_PLACEHOLDERS.get(w, w).replace("<rule>", SUBSTITUTIONS["<rule>"]) for w in words]
    if "torchrun" in words:  # its processes see WORLD_SIZE (settings such as --sync-bn need several)
        monkeypatch.setenv("WORLD_SIZE", str(_torchrun_processes(words)))
    script = next((w for w in words if w.startswith(SCRIPTS)), "")
    args = words[words.index(script) + 1:] if script else []
    if script.endswith("run_circuit.py"):
        from neurosim.tools.cli.options import parse_run_args
        from neurosim.tools.cli.run import configure

        request = parse_run_args(args)
        assert not isinstance(request, int), f"{shlex.join(words)} asks for help or gives nothing"
        if not {"--resume", "--config"} & set(args):  # those read a run an earlier command made
            configure(request)
    elif script.endswith("compare_rules.py") and "--combine" not in args:  # that one reads studies made before
        from neurosim.training.config import RULE_NAMES

        request = parse_request(args)
        plan_study(request.model, request.rules or RULE_NAMES, request.options)


def _torchrun_processes(words: list[str]) -> int:
    """The processes a torchrun command starts: --nproc_per_node × --nnodes (the largest of a range;
    a shell variable counts as 1)."""
    def value(name):
        for i, w in enumerate(words):
            text = words[i + 1] if w == name and i + 1 < len(words) else w[len(name) + 1:] if w.startswith(
                name + "=") else None
            if text is not None:
                text = text.split(":")[-1]
                return int(text) if text.isdigit() else 1
        return 1

    return value("--nproc_per_node") * value("--nnodes")


@pytest.mark.parametrize("block", [b for b in ALL if b.info != "python"], ids=lambda b: b.name)
def test_commands_name_presets_and_options_that_exist(block, monkeypatch):
    """Every training command, run here or not (a GPU, hours, ImageNet), is accepted by its program's
    checks of presets, options and values: in the quick suite, without training."""
    for words in block.commands:
        if any(w.endswith(("run_circuit.py", "compare_rules.py")) for w in words):
            _check_options(words, monkeypatch)


# -- running the blocks ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def placeholder_runs(tmp_path_factory):
    """``runs/<preset>-…`` → the directory of a short run of that preset, made on first use."""
    from neurosim.training.config import preset
    from neurosim.training.run_dir import open_run

    made, root = {}, tmp_path_factory.mktemp("placeholder-runs")

    def run_dir(name: str) -> str:
        if name not in made:
            extra = {"width": 0.125} if "resnet" in name and "imagenet" not in name else {}
            extra.update(PLACEHOLDER_WM_SETTINGS if name.startswith("wm_") else {})
            run = open_run(root / name, preset(name, **PLACEHOLDER_SETTINGS, **extra), quiet=True)
            run.train()
            if run.lock is not None:
                run.lock.release()
            made[name] = str(root / name)
        return made[name]

    return run_dir


def _substitute(text: str, placeholder_runs) -> str:
    for old, new in SUBSTITUTIONS.items():
        text = text.replace(old, new)
    return PLACEHOLDER_RUN.sub(lambda m: placeholder_runs(m[1]), text)


def _with_budget(words: list[str], folder_cache: Path) -> list[str]:
    script = next((w for w in words if w.startswith(SCRIPTS)), None)
    program = Path(script).name if script else ""
    if program not in BUDGET or "--resume" in words or "--combine" in words:
        return words
    extra = list(BUDGET[program])
    if program == "compare_rules.py":
        model = words[words.index(script) + 1]
        rules = _study_rules(words)[:STUDY_RULES]
        extra += ["--rules", ",".join(rules)]
    else:
        model = _preset_of(words) or ""
        rules = [model.split("_")[0]]
    if "resnet" in model and "imagenet" not in model:
        extra += RESNET_BUDGET
    if "wm" in rules:
        extra += WM_BUDGET
    data = words[words.index("--data") + 1] if "--data" in words else ""
    if "/" in data:  # an image folder: decoded once per session into one cache
        extra += ["--data-dir", str(folder_cache)]
    return _without(words, extra) + extra


def _without(words: list[str], extra: list[str]) -> list[str]:
    """``words`` less the options ``extra`` sets (each with its value): an option is given once."""
    names = {w for w in extra if w.startswith("--")}
    out, i = [], 0
    while i < len(words):
        head = words[i].split("=", 1)[0]
        if head in names:
            i += 1 if "=" in words[i] or head in ("--quiet", "--in-process") else 2
            continue
        out.append(words[i])
        i += 1
    return out


def _study_rules(words: list[str]) -> list[str]:
    from neurosim.training.config import RULE_NAMES

    return words[words.index("--rules") + 1].split(",") if "--rules" in words else list(RULE_NAMES)


# docs/results.md's blocks run in a file of their own (tests/test_docs_results.py): pytest-xdist
# gives a file to one worker, and together the blocks are minutes of it.
RESULTS = ROOT / "docs" / "results.md"


def _run_params(results: bool = False):
    for b in ALL:
        if b.illustration is not None or (b.path == RESULTS) != results:
            continue
        # Shell commands start processes that train and draw: seconds each, minutes together.
        marks = [pytest.mark.slow] if b.info != "python" or b.needs_data else []
        yield pytest.param(b, id=b.name, marks=marks)


@pytest.mark.parametrize("block", list(_run_params()))
def test_block_runs(block, tmp_path, tmp_path_factory, placeholder_runs, monkeypatch):
    run_block(block, tmp_path, tmp_path_factory, placeholder_runs, monkeypatch)


def run_block(block, tmp_path, tmp_path_factory, placeholder_runs, monkeypatch):
    """Run ``block`` as the module docstring says, from ``tmp_path``."""
    if block.needs_data and not SHARED_DATA.is_dir():
        pytest.skip(f"needs {SHARED_DATA}")
    monkeypatch.chdir(tmp_path)
    if block.info == "python":
        source = _substitute(block.text, placeholder_runs)
        exec(compile(source, block.name, "exec"), {"__name__": "__doc_block__"})
        return
    assert not _runnable(block), _runnable(block)
    folder_cache = tmp_path_factory.getbasetemp() / "folder-cache"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    for words in block.commands:
        words = _with_budget([_substitute(w, placeholder_runs) for w in words], folder_cache)
        words = PROGRAMS[words[0]] + [str(ROOT / w) if w.startswith(SCRIPTS) else w for w in words[1:]]
        done = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert done.returncode == 0, (f"{block.name}: {shlex.join(words)} exited {done.returncode}\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
