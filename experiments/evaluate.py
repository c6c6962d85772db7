"""Evaluate a run's checkpoint on a dataset: ``python experiments/evaluate.py RUN_DIR --data cifar100``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:  # importing torch takes seconds; a Ctrl-C meanwhile is not an error to trace
    from neurosim.cli import evaluate, main
except KeyboardInterrupt:
    print("interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    main(evaluate)
