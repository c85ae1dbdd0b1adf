"""The benchmark header reports the CPU time the VM host took (`/proc/stat`'s steal column),
which the guest's load average cannot see."""

from __future__ import annotations

from benchmarks import common as C

# user nice system idle iowait irq softirq steal guest guest_nice
START = [100, 0, 20, 1000, 5, 0, 1, 50, 0, 0]


def test_steal_share_is_the_stolen_part_of_all_ticks():
    end = [a + d for a, d in zip(START, [300, 0, 50, 100, 0, 0, 0, 150, 300, 0], strict=True)]
    # guest time is already inside user: 150 stolen of 300 + 50 + 100 + 150 = 600 ticks
    assert C.steal_share(START, end) == 0.25


def test_steal_share_without_counters_or_time_is_unknown():
    assert C.steal_share(None, START) is None
    assert C.steal_share(START, START) is None
    assert C.steal_share(START[:4], START[:4]) is None


def test_the_machine_line_names_the_steal_only_when_measured():
    m = {"cpu": "x", "cores": 2, "memory_gib": 1, "jax": "0", "loadavg_start": [0.5, 0, 0]}
    assert "stolen" not in C.machine_line(m)
    line = C.machine_line({**m, "cpu_steal": 0.384})
    assert line.endswith(
        "1-min load average at start 0.5; CPU time stolen by the VM host during the run 38%"
    )


def test_this_machine_counters_read():
    ticks = C.cpu_times()
    assert ticks is None or (len(ticks) >= 8 and all(t >= 0 for t in ticks))
