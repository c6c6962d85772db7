"""The command line: ``neurosim run|evaluate|plot|compare`` and the scripts in ``experiments/``.

- ``entry``       ``main``: runs a command; user errors, I/O errors and Ctrl-C end in one line
- ``commands``    the ``neurosim`` command, which names the others
- ``options``     the options of ``neurosim run``, built from the configuration's fields and rules
- ``run``         ``neurosim run`` (``run_circuit.py``): start, repeat or continue a run
- ``evaluation``  ``neurosim evaluate`` (``evaluate.py``)
- ``checks``      where a run or a study goes, and the device asked for, checked before anything loads

Importing the package loads no PyTorch, so ``--help`` and a mistyped option answer at once.
"""

from neurosim.tools.cli.checks import check_device, check_new_dir, check_out_dir, unique_run_dir
from neurosim.tools.cli.entry import fail, main, os_error_message
from neurosim.tools.cli.evaluation import EVAL_USAGE, evaluate
from neurosim.tools.cli.options import parse_run_args, run_usage, wants_help
from neurosim.tools.cli.run import run_circuit

__all__ = ["main", "fail", "os_error_message", "run_circuit", "run_usage", "parse_run_args", "wants_help",
           "evaluate", "EVAL_USAGE", "check_device", "check_new_dir", "check_out_dir", "unique_run_dir"]
