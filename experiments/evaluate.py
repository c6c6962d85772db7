"""Evaluate a run's checkpoint on a dataset: ``python experiments/evaluate.py RUN_DIR --data cifar100``
(``neurosim evaluate``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without installing

from neurosim.tools.cli import evaluate, main  # noqa: E402

if __name__ == "__main__":
    main(evaluate)
