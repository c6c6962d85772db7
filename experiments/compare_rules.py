"""Train every rule on one model and compare them: ``python experiments/compare_rules.py mlp_digits --epochs 10``."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Importing torch takes seconds, and a Ctrl-C inside a C extension's import can surface as
# any error: until the imports are done (nothing is written before), it ends the process.
signal.signal(signal.SIGINT, lambda *_: (sys.stderr.write("interrupted while starting; nothing was written\n"),
                                          os._exit(130)))
from neurosim.cli import main  # noqa: E402
from neurosim.study import compare_rules  # noqa: E402
signal.signal(signal.SIGINT, signal.default_int_handler)

if __name__ == "__main__":
    main(compare_rules)
