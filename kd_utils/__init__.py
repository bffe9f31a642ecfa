"""kd_utils: helpers shared by the kd-study notebooks.

One plain module per job: params, data, tasks, models, losses, teacher_cache,
training, evaluation, predictions, fidelity, statistics (a subpackage), analysis,
plots, report, study.
"""

__version__ = "0.1.0"
