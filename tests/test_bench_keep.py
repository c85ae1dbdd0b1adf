"""`benchmarks/run_all.py` never replaces a measured BENCHMARKS.md section with a skipped one
(e.g. the TRL comparison run where TRL is not installed)."""

from __future__ import annotations

from benchmarks.run_all import keeps_earlier

MEASURED = {"benchmark": "trl", "rows": [{"name": "rm"}], "meta": {"machine": {"date": "d"}}}
SKIPPED = {"benchmark": "trl", "skipped": "TRL/PEFT not importable: No module named 'trl'"}


def test_a_skipped_run_keeps_the_measured_section():
    assert keeps_earlier(SKIPPED, MEASURED)


def test_measured_runs_and_first_runs_are_written():
    assert not keeps_earlier(MEASURED, MEASURED)  # a new measurement replaces the old
    assert not keeps_earlier(SKIPPED, None)  # nothing to keep: say it was skipped
    assert not keeps_earlier(SKIPPED, SKIPPED)
