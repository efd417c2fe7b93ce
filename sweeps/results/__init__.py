"""Reading a finished sweep: its records, what each curve was, the map, the report and the export.

None of it imports ``sweeps.launch`` (tests/test_layout.py checks it), nor Ray or torch: a sweep folder or an
MLflow experiment is read with the files alone. Where a change goes:
- ``records.py``: the trial record and its vocabulary (metric names, ``Status``, ``Outcome``, the plain files);
  ``collect.py``: a sweep folder's records (``load_folder``); ``mlflow_records.py``: an MLflow experiment's
  (``load_sweep`` takes either).
- ``classify.py``: each curve's class (diverged, overfit, oscillating, slow, converged).
- ``analysis.py``: the diagnosis, LR sensitivity and stable windows; ``edges.py``: divergence edges and optima
  (and ``lr_text``, the one LR formatter); ``tradeoff.py``: the loss/forgetting front and ``best_record``;
  ``importance.py``: fANOVA parameter importance; ``questions.py``: the question specs' findings;
  ``lr_range.py``: reading an LR range test's curve.
- ``figures.py``: every figure (a new one is drawn there and listed in ``html_report.build_report``);
  ``html_report.py``: the report (figures, findings, HTML); ``browse.py``: MLflow UI links and the parent's note.
- ``export.py``: the best trial as production configs (``finetune export``).
"""
