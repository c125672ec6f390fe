"""PNG figures of a run (what `hil plot` writes).

Figures are built as bare `matplotlib.figure.Figure` objects and saved through the Agg
canvas: no pyplot, so nothing changes the backend or figure registry of the process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from hil.runlog.layout import METRICS, TILES, TRACES
from hil.runlog.reader import Run

_INDEX = ("step", "epoch")
_MAX_HISTS = 5  # snapshots drawn per tile histogram
_PANEL_COLS = 3  # panels per row of the metrics figure


def plot_run(run: Run, out: Path) -> tuple[list[Path], list[str]]:
    """Write every figure the run has data for into `out`; return (files, notes on what was
    skipped)."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    notes: list[str] = []
    tables = {s: run.table(f"{METRICS}/{s}") for s in run.streams(METRICS)}
    for name, fig in (
        ("loss", _curves(tables, lambda c: "loss" in c.lower(), "loss")),
        ("accuracy", _curves(tables, lambda c: "acc" in c.lower(), "accuracy")),
        ("metrics", metrics_figure(tables)),
    ):
        if fig is None:
            what = "other" if name == "metrics" else name
            notes.append(f"no {what} metrics: {name}.png not written")
        else:
            files.append(_save(fig, out / f"{name}.png"))
    fig = _energy(run)
    if fig is None:
        notes.append("no settle traces: settle_energy.png not written")
    else:
        files.append(_save(fig, out / "settle_energy.png"))
    tiles = run.streams(TILES)
    if not tiles:
        notes.append("no tile snapshots: no conductance histograms")
    for tile in tiles:
        fig = _histograms(run, tile)
        if fig is not None:
            files.append(_save(fig, out / f"conductance_{tile}.png"))
    return files, notes


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _curves(
    tables: dict[str, dict[str, np.ndarray]], select: Callable[[str], bool], ylabel: str
) -> Figure | None:
    series = [
        (stream, col, t["step"], t[col].astype(np.float64))
        for stream, t in tables.items()
        for col in t
        if col not in _INDEX and select(col) and np.isfinite(t[col].astype(np.float64)).any()
    ]
    if not series:
        return None
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for stream, col, step, y in series:
        ok = np.isfinite(y)
        marker = "o" if ok.sum() <= 50 else None
        ax.plot(step[ok], y[ok], marker=marker, markersize=3, label=f"{stream}/{col}")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if ylabel == "loss" and all((y[np.isfinite(y)] > 0).all() for *_, y in series):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _other(column: str) -> bool:
    """Neither a loss nor an accuracy (those have figures of their own)."""
    return "loss" not in column.lower() and "acc" not in column.lower()


def metrics_figure(
    tables: dict[str, dict[str, np.ndarray]], select: Callable[[str], bool] = _other
) -> Figure | None:
    """One panel per metric (its own y axis: settle steps, joules and nats differ by orders of
    magnitude), a line per stream that logged it; a log axis for a positive metric spanning
    more than two decades."""
    by_metric: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for stream, t in tables.items():
        for col in t:
            y = t[col].astype(np.float64)
            if col not in _INDEX and select(col) and np.isfinite(y).any():
                by_metric.setdefault(col, []).append((stream, t["step"], y))
    if not by_metric:
        return None
    cols = min(_PANEL_COLS, len(by_metric))
    rows = -(-len(by_metric) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (metric, series) in zip(axes, by_metric.items(), strict=False):
        values = np.concatenate([y[np.isfinite(y)] for *_, y in series])
        for stream, step, y in series:
            ok = np.isfinite(y)
            marker = "o" if ok.sum() <= 50 else None
            ax.plot(step[ok], y[ok], marker=marker, markersize=3, label=stream)
        if (values > 0).all() and values.max() > 100 * values.min():
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(by_metric) :]:
        fig.delaxes(ax)
    return fig


def _energy(run: Run) -> Figure | None:
    """Batch-mean energy against settle step: free (solid) vs nudged (dashed) settles of the
    first and the last traced training step."""
    if f"{TRACES}/settles" not in run.tables or not run.tables[f"{TRACES}/settles"]:
        return None
    settles = run.table(f"{TRACES}/settles")
    points = run.table(f"{TRACES}/points")
    phases = run.labels(f"{TRACES}/settles", "phase")
    blocks = run.labels(f"{TRACES}/settles", "block")
    steps = np.unique(settles["step"])
    chosen = [steps[0]] if len(steps) == 1 else [steps[0], steps[-1]]
    fig = Figure(figsize=(6 * len(chosen), 4.2))
    axes = fig.subplots(1, len(chosen), squeeze=False)
    for ax, step in zip(axes[0], chosen, strict=True):
        for i in np.flatnonzero(settles["step"] == step):
            a, n = int(settles["start"][i]), int(settles["length"][i])
            phase = phases[settles["phase"][i]] if phases else "?"
            block = blocks[settles["block"][i]] if blocks else ""
            label = f"{block} {phase}".strip()
            style = "-" if phase == "free" else "--"
            ax.plot(points["settle_step"][a : a + n], points["energy_mean"][a : a + n], style, label=label)
        ax.set_title(f"training step {step}")
        ax.set_xlabel("settle step")
        ax.set_ylabel("energy (batch mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _histograms(run: Run, tile: str) -> Figure | None:
    """G+ and G- (or the weights, if no conductances were logged) at up to five snapshots,
    coloured from early (dark) to late (light)."""
    t = run.table(f"{TILES}/{tile}")
    cols = [c for c in ("g_plus", "g_minus") if c in t] or [c for c in ("weights",) if c in t]
    if not cols or not len(t["step"]):
        return None
    fig = Figure(figsize=(6 * len(cols), 4.2))
    axes = fig.subplots(1, len(cols), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        rows = [i for i in range(len(t["step"])) if np.isfinite(t[col][i]).all()]
        if not rows:
            continue
        pick = [rows[round(j)] for j in np.linspace(0, len(rows) - 1, min(_MAX_HISTS, len(rows)))]
        scale, unit = (1e6, "µS") if col != "weights" else (1.0, "weight units")
        colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(pick)))
        for colour, i in zip(colours, pick, strict=True):
            ax.hist(
                t[col][i].ravel() * scale,
                bins=60,
                histtype="step",
                color=colour,
                label=f"step {t['step'][i]}",
            )
        ax.set_title(f"{tile} {col}")
        ax.set_xlabel(unit)
        ax.set_ylabel("devices")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return fig
