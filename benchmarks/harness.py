"""LoRA vs full fine-tuning, side by side in one process: the case record, the runner that
measures memory and interleaved step times, and the markdown table every training benchmark
renders."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks import common as C


@dataclasses.dataclass
class Case:
    """One way of running a step (`lora` or `full`), compiled and ready.

    `run()` executes one step or iteration and blocks; it may return {phase: seconds}.
    `programs`: compile statistics of each compiled program the step calls."""

    mode: str
    run: Callable[[], Any]
    programs: dict[str, dict]
    trainable_bytes: int
    optimizer_bytes: int
    frozen_bytes: int
    tokens: int
    flops_xla: float | None = None
    flops_analytic: float | None = None
    notes: str = ""
    hlo: Callable[[], str] | None = None
    """The optimized HLO text of the main program (for `profile_step.py`)."""


def _phase_medians(records: list[dict]) -> dict:
    if not records:
        return {}
    return {k: round(statistics.median(r[k] for r in records), 4) for k in records[0]}


def run_cases(cases: list[Case], *, repeats: int, roofline: dict | None) -> dict:
    """One warm-up step per case, then `repeats` interleaved timed steps. Returns
    {mode: measurements} plus `ratios` (full over LoRA)."""
    out: dict[str, Any] = {c.mode: {} for c in cases}
    phases: dict[str, list[dict]] = {c.mode: [] for c in cases}
    for c in cases:
        c.run()
    times: dict[str, list[float]] = {c.mode: [] for c in cases}
    for r in range(repeats):
        for c in cases if r % 2 == 0 else cases[::-1]:
            t0 = time.perf_counter()
            ph = c.run()
            times[c.mode].append(time.perf_counter() - t0)
            if isinstance(ph, dict):
                phases[c.mode].append(ph)
    for c in cases:
        t = C.summarize(times[c.mode])
        footprints = [p.get("footprint_bytes", 0) for p in c.programs.values()]
        entry = out[c.mode]
        entry.update(
            time=t,
            phases_median_s=_phase_medians(phases[c.mode]),
            tokens=c.tokens,
            tokens_per_s=round(c.tokens / t["median_s"], 1),
            programs=c.programs,
            peak_program_footprint_bytes=max(footprints) if footprints else None,
            trainable_bytes=c.trainable_bytes,
            optimizer_bytes=c.optimizer_bytes,
            trainable_state_bytes=c.trainable_bytes + c.optimizer_bytes,
            frozen_bytes=c.frozen_bytes,
            resident_bytes=c.trainable_bytes + c.optimizer_bytes + c.frozen_bytes,
            flops_xla=c.flops_xla,
            flops_analytic=c.flops_analytic,
            notes=c.notes,
        )
        C.with_rates(
            entry, flops=c.flops_xla or c.flops_analytic, seconds=t["median_s"], roofline=roofline
        )
    if "lora" in out and "full" in out:
        lo, fu = out["lora"], out["full"]

        def ratio(key):
            a, b = fu.get(key), lo.get(key)
            return round(a / b, 2) if a and b else None

        out["ratios"] = {
            "full_over_lora_trainable_state": ratio("trainable_state_bytes"),
            "full_over_lora_resident": ratio("resident_bytes"),
            "full_over_lora_peak_program": ratio("peak_program_footprint_bytes"),
            "lora_speedup": round(fu["time"]["median_s"] / lo["time"]["median_s"], 2),
        }
    return out


def render_sizes(result: dict, *, what: str) -> str:
    """The LoRA-vs-full table of a training benchmark, one row per (size, mode)."""
    rows = []
    for entry in result["sizes"]:
        size = entry["size"]
        for mode in ("lora", "full"):
            m = entry.get(mode)
            if m is None:
                continue
            flops = m.get("flops_xla") or m.get("flops_analytic")
            rows.append(
                [
                    f"{size} ({entry['model']['params'] / 1e6:.0f}M)",
                    mode,
                    C.fmt(m["time"]["median_s"], 3) + f" (n={m['time']['n']})",
                    C.fmt(m["tokens_per_s"], 0),
                    C.fmt(flops / 1e9 if flops else None, 0),
                    C.fmt(m.get("gflops_per_s"), 1),
                    C.fmt_share(m.get("roofline_share")),
                    C.fmt_bytes(m["peak_program_footprint_bytes"]),
                    C.fmt_bytes(m["trainable_state_bytes"]),
                    C.fmt_bytes(m["resident_bytes"]),
                ]
            )
        r = entry.get("ratios")
        if r:
            rows.append(
                [
                    f"{size}",
                    "**full/LoRA**",
                    f"**time ×{C.fmt(r['lora_speedup'])}**",
                    "",
                    "",
                    "",
                    "",
                    f"{C.fmt(r['full_over_lora_peak_program'])}×",
                    f"{C.fmt(r['full_over_lora_trainable_state'], 0)}×",
                    f"{C.fmt(r['full_over_lora_resident'])}×",
                ]
            )
    headers = [
        "model",
        "mode",
        f"{what} time, s (median)",
        "tokens/s",
        "GFLOP / step",
        "GFLOP/s",
        "% fp32 matmul roofline",
        "compiled peak (arg+out+temp)",
        "trainable + Adam",
        "resident params + state",
    ]
    return C.table(headers, rows)


def render_phases(result: dict) -> str:
    """Median seconds of each phase of an iteration (rollout, scoring, update, …)."""
    rows = []
    for entry in result["sizes"]:
        for mode in ("lora", "full"):
            m = entry.get(mode)
            if not m or not m.get("phases_median_s"):
                continue
            ph = m["phases_median_s"]
            total = sum(ph.values()) or 1.0
            rows.append(
                [entry["size"], mode] + [f"{v:.3f} ({100 * v / total:.0f}%)" for v in ph.values()]
            )
            headers = ["model", "mode"] + list(ph)
    if not rows:
        return ""
    return C.table(headers, rows)


def render_breakdown(result: dict) -> str:
    """Forward / forward+backward / whole step, where a benchmark measured them."""
    rows = []
    for entry in result["sizes"]:
        b = entry.get("breakdown")
        if not b:
            continue
        for mode, parts in b.items():
            step = parts.get("step_s")
            cells = []
            for k in ("forward_s", "grad_s", "step_s"):
                v = parts.get(k)
                cells.append(
                    "–" if v is None else f"{v:.3f}" + (f" ({100 * v / step:.0f}%)" if step else "")
                )
            rows.append([entry["size"], mode] + cells)
    if not rows:
        return ""
    return C.table(
        [
            "model",
            "mode",
            "forward only, s",
            "forward + backward, s",
            "whole step (+ clip + AdamW), s",
        ],
        rows,
    )
