"""The README's code runs as written, and its set-up commands are the ones the project runs.

(tests/test_docs.py runs or checks every block of the README and docs/.)"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_circuit_block_builds_and_steps_the_circuit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2  # building a circuit; converting a torch.nn model
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert set(namespace["c"].alignment_angles()) == {"x->h", "pool->y"}
    namespace = {}
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    assert len(namespace["circuit"].synapses) == 21  # ResNet-18: 17 convolutions, 3 shortcuts, the classifier


def test_readme_starts_with_install_test_and_the_main_job_and_names_the_whole_suite():
    first = re.search(r"```\n(.*?)```\n\n(.*?)\n", README, re.S)
    assert first[1].splitlines() == ['pip install -e ".[dev]"', "pytest",
                                     "python experiments/run_circuit.py kp_resnet18"]
    assert "`pytest --runslow`" in first[2], "the line below the set-up commands names the whole suite's command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "pytest --runslow" in ci, ".ci/run runs the README's command for the whole suite"
    assert sum(line.lstrip().startswith(("pytest", "python -m pytest")) for line in ci) == 1  # once


def test_presets_doc_is_current():
    from neurosim.training.presets_doc import presets_markdown

    doc = (ROOT / "docs" / "presets.md").read_text()
    assert doc == presets_markdown(), "regenerate with: python -m neurosim.training.presets_doc > docs/presets.md"
