"""The sweep's parent run in a real MLflow store (SQLite): its note fits MLflow's limit on a tag's value without
MLflow's truncation warning, begins with a summary, and links the full findings, which are an artifact in full; the
printed curves link opens on a log y-axis.

    python -m pytest -q tests/sweeps/test_note.py
"""
from __future__ import annotations

import logging
from urllib.parse import unquote

import pytest

from sweeps.launch.finish import log_parent_run
from sweeps.launch.tracking import Tracker
from sweeps.results.browse import FINDINGS_FILE, NOTE_LIMIT, parent_note, ui_links
from sweeps.results.html_report import Report
from sweeps.results.records import TrialRecord


def test_mlflows_limit_is_the_one_the_note_is_cut_to():
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    assert NOTE_LIMIT == MAX_TAG_VAL_LENGTH


@pytest.fixture
def logged(tmp_path, caplog):
    """A parent run whose findings are longer than MLflow keeps in a tag (the issue's sweep: 9,188 characters)."""
    from mlflow.tracking import MlflowClient

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "note", tmp_path, (tmp_path / "artifacts").as_uri())
    parent = tracker.parent_run({"name": "note"}, {"role": "sweep"})
    findings = [f"finding {i:03d}: " + "the held-out loss of this group rose and fell at these learning rates " * 2
                for i in range(64)]
    figure = tmp_path / "map.png"
    figure.write_bytes(b"\x89PNG not really")
    html = tmp_path / "report.html"
    html.write_text("<html></html>")
    records = [TrialRecord(f"t{i}", config={"method": "full", "learning_rate": 1e-3}, outcome=o)
               for i, o in enumerate(["converged"] * 30 + ["diverged"] * 12)]
    experiment = tracker.experiment_id()
    links = ui_links("http://127.0.0.1:5000", experiment, parent, [f"{i:032x}" for i in range(42)])
    with caplog.at_level(logging.WARNING):
        log_parent_run(tracker, "note", Report([figure], html, findings), records, links, "t0 full lr=0.001", None,
                       "eval_loss", extra=[], wall_s=1.0)
    assert tracker.flush() == 0
    client = MlflowClient(tracking_uri=tracker.uri)
    return client, parent, findings, links, caplog.records, tmp_path


def test_the_note_fits_mlflows_limit_with_a_summary_first_and_links_the_full_findings(logged):
    client, parent, findings, links, warnings, _ = logged
    assert len("\n".join(f"- {f}" for f in findings)) > NOTE_LIMIT, "the findings alone are longer than a note may be"
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert len(note) <= NOTE_LIMIT
    assert not [w for w in warnings if "truncated" in w.getMessage()], "MLflow did not have to cut it"
    lines = note.splitlines()
    assert lines[2] == "**Best:** t0 full lr=0.001" and lines[4] == "**Trials:** 42: 30 converged, 12 diverged"
    assert lines[6] == f"**Findings** (64; all of them in [`{FINDINGS_FILE}`]({links['findings']}))"
    shown = [ln[2:] for ln in lines if ln.startswith("- finding ")]
    assert shown == findings[: len(shown)] and 10 < len(shown) < 64, "the first findings, in order, as many as fit"
    assert f"- ... {64 - len(shown)} more finding(s) in [`{FINDINGS_FILE}`]" in note
    assert "`map.png`" in note and "**Open**" in note


def test_the_full_findings_are_an_artifact_of_the_parent_run_where_the_note_points(logged, tmp_path):
    client, parent, findings, links, _, _ = logged
    path = client.download_artifacts(parent, FINDINGS_FILE, str(tmp_path / "down"))
    assert open(path).read() == "\n".join(findings)
    assert links["findings"].split("#")[1].startswith(f"/experiments/{client.get_run(parent).info.experiment_id}"
                                                      f"/runs/{parent}/artifacts/{FINDINGS_FILE}")


def test_the_curves_link_opens_on_a_log_y_axis():
    url = unquote(ui_links("http://h:5000", "1", "p", ["a", "b"])["curves"])
    assert "y_axis_scale=log" in url and "y_axis_scale=linear" not in url


def test_a_note_whose_links_alone_would_fill_it_keeps_the_findings_and_says_where_the_links_are():
    links = ui_links("http://h:5000", "1", "p", [f"{i:032x}" for i in range(400)])
    note = parent_note("big", ["one finding"], ["map.png"], links, None)
    assert len(note) <= NOTE_LIMIT and "- one finding" in note
    assert "the links are printed at the end of the sweep and in `report.html`" in note
