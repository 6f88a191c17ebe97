"""Replay results as a text table, a Markdown table, JSON and a PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from .harness import MAX_ATTEMPTS, WorkflowResult

OURS = "raysched"
FLOOR = "oracle"


def best_other(result: WorkflowResult) -> tuple[str, float] | None:
    """The baseline (not raysched, not the oracle) with the least wastage."""
    others = [(t.wastage_gbh, m) for m, t in result.methods.items() if not m.startswith(OURS) and m != FLOOR]
    if not others:
        return None
    w, m = min(others)
    return m, w


def ratio(result: WorkflowResult, ours_name: str = OURS) -> float | None:
    """raysched's wastage over the best other method's (below 1: raysched wastes less);
    ``math.inf`` when the best other wastes nothing and raysched something (a loss with no
    ratio to speak of: ``ratio_text`` says so)."""
    bo = best_other(result)
    if bo is None or ours_name not in result.methods or result.methods[ours_name].tasks == 0:
        return None  # nothing replayed: no ratio, rather than a 1.0 that reads as a tie
    ours = result.methods[ours_name].wastage_gbh
    if bo[1] <= 0:
        return 1.0 if ours <= 0 else math.inf
    return ours / bo[1]


def ratio_text(rt: float, bold: bool = False) -> str:
    """A ratio as the tables print it: "-" where the best other method wastes nothing."""
    if math.isinf(rt):
        return "- (best other wastes 0)"
    return f"**{rt:.2f}**" if bold and rt <= GOAL_RATIO else f"{rt:.2f}"


def median_text(rt: float) -> str:
    return f"{rt:.2f}" if math.isfinite(rt) else "- (half or more lose to a method that wastes nothing)"


def to_json(results: Sequence[WorkflowResult], seed: int) -> dict[str, object]:
    out: dict[str, object] = {"seed": seed, "workflows": {}}
    for r in results:
        entry = r.as_dict()
        bo = best_other(r)
        for ours in [m for m in r.methods if m.startswith(OURS)]:
            rt = ratio(r, ours)
            if rt is not None and bo is not None:
                # JSON has no infinity (json.dump would write the non-standard Infinity): null,
                # and said why.
                entry[f"{ours}_vs_best_other"] = ({"best_other": bo[0], "ratio": rt} if math.isfinite(rt) else
                                                  {"best_other": bo[0], "ratio": None, "best_other_wastes_nothing": True})
        out["workflows"][r.name] = entry  # type: ignore[index]
    return out


def write_json(results: Sequence[WorkflowResult], path: str | Path, seed: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(to_json(results, seed), fh, indent=2, sort_keys=False)
        fh.write("\n")


def text_table(result: WorkflowResult) -> str:
    """One workflow: a row per method."""
    # A lotaru trace is split by its own labels: a type it skips lacks history or online rows.
    too_small = "without both history and online rows" if result.format == "lotaru" else "too small"
    lines = [
        f"{result.name} ({result.format}, seed {result.seed}): {result.task_types} task type(s) replayed"
        + (f", {len(result.skipped_types)} {too_small}" if result.skipped_types else "")
        + (f", {sum(result.skipped_rows.values())} row(s) skipped" if result.skipped_rows else ""),
        f"  {'method':<16}{'wastage GBh':>13}{'failures':>10}{'tasks':>8}{'fail %':>8}{'MAQ':>7}{'seconds':>9}",
    ]
    if not any(t.tasks for t in result.methods.values()):
        lines[1:] = ["  nothing to replay"]
        return "\n".join(lines)
    for name, t in result.methods.items():
        lines.append(
            f"  {name:<16}{t.wastage_gbh:>13.2f}{t.failures:>10d}{t.tasks:>8d}{100 * t.failure_rate:>7.1f}%"
            f"{t.maq:>7.3f}{t.seconds:>9.2f}"
            + (f"  ({t.given_up} job(s) given up after {MAX_ATTEMPTS} attempts)" if t.given_up else "")
        )
    bo = best_other(result)
    for ours in [m for m in result.methods if m.startswith(OURS)]:
        rt = ratio(result, ours)
        if rt is not None and bo is not None:
            verdict = "wins (goal <= 0.75)" if rt <= 0.75 else ("better, short of the goal" if rt < 1 else "LOSES")
            lines.append(f"  {ours} / best other ({bo[0]}): {ratio_text(rt)}  -> {verdict}")
    return "\n".join(lines)


#: The issue's goal: wastage at most this share of the best other method's...
GOAL_RATIO = 0.75
#: ...with failed attempts under this share of the tasks.
GOAL_FAILURES = 0.05


def goal_summary(results: Sequence[WorkflowResult], ours_name: str = OURS) -> str:
    """How many workflows meet the goal, and the medians of the ratio and of the failure rate."""
    rows = []
    for r in results:
        if ours_name in r.methods and r.methods[ours_name].tasks == 0:
            continue  # nothing was replayed (a header-only trace, or every type too small)
        rt = ratio(r, ours_name)
        if rt is not None:
            rows.append((r.name, rt, r.methods[ours_name].failure_rate))
    if not rows:
        return ""
    met = [name for name, rt, f in rows if rt <= GOAL_RATIO and f < GOAL_FAILURES]
    ratios = sorted(rt for _, rt, _ in rows)
    fails = sorted(f for _, _, f in rows)
    median = lambda v: (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2  # noqa: E731
    return (f"{ours_name}: goal (wastage <= {GOAL_RATIO} x the best other's, failed attempts < "
            f"{GOAL_FAILURES:.0%}) met on {len(met)} of {len(rows)} workflow(s)"
            + (f": {', '.join(met)}" if met else "")
            + f"; ratio <= {GOAL_RATIO} on {sum(rt <= GOAL_RATIO for rt in ratios)}, below 1 on "
            f"{sum(rt < 1 for rt in ratios)}; median ratio {median_text(median(ratios))}, median failed attempts "
            f"{100 * median(fails):.1f}%")


def markdown_table(results: Sequence[WorkflowResult], methods: Iterable[str]) -> str:
    """Wastage (GBh) per workflow and method, raysched / best other, failure rates."""
    methods = list(methods)
    ours_names = [m for m in methods if m.startswith(OURS)]
    head = ["workflow", *methods, "best other", *(f"{o} / best" for o in ours_names),
            *(f"{o} fail %" for o in ours_names), "best other fail %", *(f"{o} s" for o in ours_names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        bo = best_other(r)
        cells = [r.name]
        for m in methods:
            t = r.methods.get(m)
            cells.append("" if t is None else f"{t.wastage_gbh:.2f}")
        cells.append(bo[0] if bo else "")
        for o in ours_names:
            rt = ratio(r, o)
            cells.append("" if rt is None else ratio_text(rt, bold=True))
        for o in ours_names:
            t = r.methods.get(o)
            cells.append("" if t is None else f"{100 * t.failure_rate:.1f}")
        cells.append("" if bo is None else f"{100 * r.methods[bo[0]].failure_rate:.1f}")
        for o in ours_names:
            t = r.methods.get(o)
            cells.append("" if t is None else f"{t.seconds:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_target(path: str | Path) -> Path:
    """Where ``plot`` writes for ``path``: ``path`` itself, or with ``.png`` added when it
    has no extension (as matplotlib does). A ValueError, before any replay, for an
    extension matplotlib cannot write or a matplotlib that does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ValueError(f"a plot needs matplotlib, which does not import here ({exc})") from None
    target = Path(path)
    extension = target.suffix.lstrip(".").lower()
    if not extension:
        return target.with_name(target.name + ".png")
    supported = Figure().canvas.get_supported_filetypes()
    if extension not in supported:
        raise ValueError(f"cannot write a plot as .{extension}; matplotlib writes "
                         + ", ".join("." + k for k in sorted(supported)))
    return target


def plot(results: Sequence[WorkflowResult], path: str | Path) -> None:
    """A PNG: wastage per method (bars) per workflow, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods: list[str] = []
    for r in results:
        for m in r.methods:
            if m != FLOOR and m not in methods:
                methods.append(m)
    names = [r.name for r in results]
    n, k = len(names), len(methods)
    width = 0.8 / max(k, 1)
    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.5 * n + 3)), 6.0))
    colors = plt.get_cmap("tab10")
    x = np.arange(n)
    for j, m in enumerate(methods):
        vals = [max(r.methods[m].wastage_gbh, 1e-3) if m in r.methods else np.nan for r in results]
        ax.bar(x + (j - (k - 1) / 2) * width, vals, width, label=m, color=colors(j % 10),
               edgecolor="black" if m == OURS else None, linewidth=0.8 if m == OURS else 0)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=8)
    ax.set_ylabel("memory wastage (GB-hours, log scale)")
    seeds = sorted({r.seed for r in results})
    ax.set_title(f"Trace replay (Sizey protocol, seed {', '.join(map(str, seeds))}): wastage per method")
    ax.legend(ncol=min(k, 7), fontsize=8, loc="upper left")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
