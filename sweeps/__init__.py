"""Fine-tuning sweeps: Ray Tune schedules trials, Optuna samples and prunes, MLflow records.

    finetune sweep search_spaces/lr.yaml      # = python sweeps/run.py search_spaces/lr.yaml
    finetune report SWEEP_DIR                 # = python sweeps/report.py SWEEP_DIR

Two subpackages, and what both use at the top:
- ``sweeps.launch``: running a sweep (the Tuner, the trial, pruning, refinement, placement, MLflow writer).
- ``sweeps.results``: reading a finished sweep (records, classification, analysis, figures, report, export).
  It never imports ``sweeps.launch`` (tests/test_layout.py checks it).
- ``spec.py``: the sweep spec schema and ``trial_config``/``sampled_settings``, the one place sampled values
  become a trial's settings; ``faults.py``: the machine's faults and the atomic writes both sides use;
  ``run.py``, ``report.py`` and ``cli.py`` (``finetune``): the commands.
"""
