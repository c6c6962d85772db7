"""Draw the figures of runs: ``python experiments/plot_run.py runs/kp_… runs/wm_… --out figs``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:  # importing torch takes seconds; a Ctrl-C meanwhile is not an error to trace
    from neurosim.cli import main
    from neurosim.plot_cli import plot_run
except KeyboardInterrupt:
    print("interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    main(plot_run)
