"""The phase figure: minima reached and their overlap vs beta, the derived beta_c marked.
A bare `matplotlib.figure.Figure` on the Agg canvas (no pyplot: no global figure state)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hil.mhn.diagnose import PhaseReport


def phase_figure(report: PhaseReport, title: str, beta: float | None = None) -> Figure:
    pts = sorted(report.points, key=lambda p: p.beta)
    b = [p.beta for p in pts]
    fig = Figure(figsize=(7.5, 5.5))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(b, [p.minima for p in pts], "o-", label="all starts")
    top.plot(b, [p.minima_centre for p in pts], "s--", label="starts near the single attractor")
    top.set_ylabel("distinct minima reached")
    bottom.plot(b, [p.mean_overlap for p in pts], "o-", label="mean overlap of end states")
    bottom.plot(b, [p.escaped for p in pts], "s--", label="near-centre starts escaped")
    bottom.set_ylabel("overlap / fraction")
    bottom.set_xlabel("beta")
    bottom.set_ylim(-0.05, 1.05)
    for ax in (top, bottom):
        ax.set_xscale("log")
        ax.axvline(report.crit.beta_c, color="k", ls=":", label=f"derived beta_c {report.crit.beta_c:.3g}")
        meas = report.beta_c_measured
        if math.isfinite(meas):
            ax.axvline(meas, color="C3", ls="-.", label=f"measured {meas:.3g}")
        if beta is not None:
            ax.axvline(beta, color="C2", lw=2, alpha=0.5, label=f"your beta {beta:.3g}")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_phase_figure(report: PhaseReport, path: Path, title: str, beta: float | None = None) -> Path:
    phase_figure(report, title, beta).savefig(path, dpi=110)
    return path
