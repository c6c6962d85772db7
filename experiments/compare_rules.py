"""Train every rule on one model and compare them: ``python experiments/compare_rules.py mlp_digits --epochs 10``
(``neurosim compare``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without installing

from neurosim.tools.cli import main  # noqa: E402
from neurosim.tools.study import compare_rules  # noqa: E402

if __name__ == "__main__":
    main(compare_rules)
