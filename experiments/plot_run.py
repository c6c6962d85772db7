"""Draw the figures of runs: ``python experiments/plot_run.py runs/kp_… runs/wm_… --out figs`` (``neurosim plot``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without installing

from neurosim.tools.cli import main  # noqa: E402
from neurosim.tools.cli.plot import plot_run  # noqa: E402

if __name__ == "__main__":
    main(plot_run)
