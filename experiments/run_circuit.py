"""Train a circuit from a preset: ``python experiments/run_circuit.py kp_mlp_digits``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:  # importing torch takes seconds; a Ctrl-C meanwhile is not an error to trace
    from neurosim.cli import main, run_circuit
except KeyboardInterrupt:
    print("interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    main(run_circuit)
