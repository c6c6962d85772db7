"""Rule studies: several plasticity rules trained side by side on one model, seed, data and budget,
then compared in one report — ``neurosim compare`` / ``experiments/compare_rules.py``. The package
owns the study's command line and plan (``plan``), the running of its runs one after another and the
study directory they fill (``runner``), the report read from those files (``report``) and its
figures (``figures``), and the report of several studies that differ only in their seed
(``seeds``, ``--combine``); within it, imports go runner → seeds → plan → report → figures. It stands on top of
the library and may import everything below it: the command line's option parsing and checks
(``neurosim.tools.cli``), the configurations and presets (``neurosim.training.config``), the data sets' names, the
run log, monitor files and plots; nothing below imports it. The names here are the ones other code
and tests use.
"""

from neurosim.tools.study.figures import draw_figures
from neurosim.tools.study.plan import (
                                 MACHINE_SETTINGS,
                                 Plan,
                                 Request,
                                 effective_settings,
                                 one_name_per_rule,
                                 parse_request,
                                 parse_rules,
                                 plan_study,
                                 usage,
)
from neurosim.tools.study.report import (
                                 RuleResult,
                                 collect,
                                 epochs_done,
                                 failure_text,
                                 read_study,
                                 report_markdown,
                                 run_state,
                                 write_report,
                                 write_study,
)
from neurosim.tools.study.runner import Runner, compare_rules, run_args, run_circuit_command
from neurosim.tools.study.seeds import combine

__all__ = ["MACHINE_SETTINGS", "Plan", "Request", "RuleResult", "Runner", "collect", "combine", "compare_rules",
           "draw_figures", "effective_settings", "epochs_done", "failure_text", "one_name_per_rule",
           "parse_request", "parse_rules", "plan_study", "read_study", "report_markdown", "run_args",
           "run_circuit_command", "run_state", "usage", "write_report", "write_study"]
