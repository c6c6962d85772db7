"""Train a circuit from a preset: ``python experiments/run_circuit.py kp_mlp_digits`` (``neurosim run``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without installing

from neurosim.tools.cli import main, run_circuit  # noqa: E402

if __name__ == "__main__":
    main(run_circuit)
