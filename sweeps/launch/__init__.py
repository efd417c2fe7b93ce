"""Running a sweep: from a validated spec to trials on Ray, pruned, refined and logged to MLflow.

Where a change goes:
- ``sweep.py``: the driver (``run_sweep``): Ray, the Tuner, resume, the end of the sweep.
- ``space.py``: the spec's space as Optuna distributions and the grid; ``refine.py``: refinement (the next
  learning rates bisecting a divergence edge or an optimum, proposed from the study).
- ``pruning.py``: the pruning bridge (searcher and stopper: divergence and the median/halving rules).
- ``trial.py``: one trial in its Ray worker; ``watchdog.py``: a stalled trial; ``budget.py``: the time budget.
- ``placement.py``: where trials run (GPU shares from memory estimates, the ``--dry-run`` plan).
- ``tracking.py``: the MLflow writer (the only one); ``progress.py``: the console lines; ``folder.py``: each
  trial's files in the sweep folder as it reports; ``resume.py``: a resume after a hard kill.
- ``finish.py``: the end of a sweep (classify, trials.json, summary, report, parent run).
- ``lr_find.py``: the learning-rate range test (``finetune lr-find``), run before a sweep.

It may import ``sweeps.results`` (finish draws the report); never the other way round.
"""
