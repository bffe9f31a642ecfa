"""kd_utils: helpers shared by the kd-study notebooks.

One plain module per job (docs/notebooks.md lists them by job): settings (config, cache_config,
constants, params, protocols, precision, seeds), tasks and data (tasks, choice_scoring, data_files,
training_mix, decontamination), models and training (models, batches, losses, objectives, teachers,
training, checkpoints), the teacher cache (cache_format, cache_encoding, cache_writer, cache_reader,
teacher_cache), evaluation (evaluation, predictions, fidelity), statistics (a subpackage; analysis,
pipeline_simulation), the report (report, report_blocks, report_findings, provenance, plots) and the
runner (plan, executors, run_records, study, cost_table, costs, dry_run).
"""

__version__ = "0.1.0"
