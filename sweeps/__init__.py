"""The sweep driver: Ray Tune schedules trials, Optuna samples and prunes, MLflow records.

    python sweeps/run.py search_spaces/lr.yaml
    python sweeps/report.py SWEEP_DIR
"""
