"""`benchmarks/quant.py`'s whole-run memory helpers: a child's own peak RSS, the frozen base's
bytes read back from a run's log, the generated pairs and the `--only` parts."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import common as C
from benchmarks import quant as Q
from jaxrlhf.lora import TrainableSummary

MIB = 1024 * 1024


def test_frozen_mib_reads_the_line_a_run_prints():
    line = str(TrainableSummary(2_442_816, 136_957_824, 9 * MIB, 18 * MIB, int(92.1 * MIB)))
    log = f"mesh: data=1, fsdp=1, tensor=1 (1 devices)\n{line}\nexported adapter to x\n"
    assert Q.frozen_mib(log) == 92.10
    assert Q.frozen_mib("no summary here") is None


def test_run_child_reports_each_childs_own_peak(tmp_path):
    # A child that touches 256 MiB, then one that allocates nothing: the second's peak must
    # be its own, neither the maximum over all children so far (RUSAGE_CHILDREN) nor this
    # pytest process's resident set (jax imported, well over 100 MiB), which Linux carries
    # into the ru_maxrss of a child exec'd straight from here.
    big = C.run_child(
        ["-c", "import numpy as np; a = np.ones(256 * 2**20 // 8); print(a.sum())"],
        tmp_path / "big.log",
    )
    small = C.run_child(["-c", "pass"], tmp_path / "small.log")
    assert big["peak_rss"] >= 256 * MIB
    assert small["peak_rss"] < 100 * MIB
    assert (tmp_path / "big.log").read_text().strip() == str(float(256 * 2**20 // 8))
    assert big["wall_s"] > 0


def test_parse_peak_reads_kib():
    assert C.parse_peak("0 2394928") == (0, 2394928 * 1024)


def test_a_failing_child_is_an_error_naming_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="fail.log"):
        C.run_child(["-c", "raise SystemExit(3)"], tmp_path / "fail.log")


def test_preference_pairs_prefer_the_upper_case_reply():
    rows = Q.preference_pairs(40, seed=1)
    assert len(rows) == 40 and rows == Q.preference_pairs(40, seed=1)
    for r in rows:
        assert r["chosen"] == r["rejected"].upper() != r["rejected"]
        assert r["prompt"] == "say: " + r["rejected"].split()[0]  # the reply's first word


def test_only_takes_known_parts():
    assert Q.parse_parts("memory, dense") == ("memory", "dense")
    with pytest.raises(argparse.ArgumentTypeError, match="choose from quality, hlo"):
        Q.parse_parts("memory,speed")
