"""Human-readable views of a record: a short text summary and a one-page PNG report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calibration.pulse_fit import shape
from calibration.record import CalibrationRecord, ChannelCal, PulseModel

BANK_TITLES = {"dac": "DAC", "adc": "state ADC", "mvm": "mvm ADC"}
# the kind of reason an invalid converter channel's record gives, by a phrase it contains
REASON_KINDS = {"ir_drop": "ir_drop", "rail": "rail", "pins the gain": "imprecise", "residuals": "not_a_line"}


def reason_kind(why: str) -> str:
    """``ir_drop``, ``rail``, ``imprecise``, ``not_a_line`` or ``other``: the kind of reason a
    record gives for an invalid converter channel."""
    return next((kind for key, kind in REASON_KINDS.items() if key in why), "other")


def _bank_line(cal: ChannelCal) -> str:
    v = cal.valid
    if not v.any():
        return f"{BANK_TITLES.get(cal.bank, cal.bank):<10} no channel measured"
    g = cal.gain[v]
    o = cal.offset[v] / cal.lsb
    return (
        f"{BANK_TITLES.get(cal.bank, cal.bank):<10} {int(v.sum())}/{cal.channels} channels  "
        f"gain {np.mean(g):.4f} +- {np.std(g):.4f} (se {np.median(cal.gain_se[v]) * 100:.3f} %)  "
        f"offset rms {np.sqrt(np.mean(o**2)):.2f} LSB (se {np.median(cal.offset_se[v]) / cal.lsb:.2f} LSB)"
    )


def _sigmas(margin: float) -> str:
    """A stuck-device margin in standard deviations; a noiseless board's is huge."""
    return f"{margin:.1f} sigma" if margin < 1000 else "more than 1000 sigma (no read noise)"


def summary(record: CalibrationRecord) -> str:
    """A few lines per routine: what was found, and how precisely."""
    lines = [f"board      {record.identity.idn()}", f"created    {record.created}"]
    lines.append(f"routines   {', '.join(record.routines)}")
    for cal in record.converters.values():
        lines.append(_bank_line(cal))
        invalid = cal.info.get("invalid", {})
        ir = sum(1 for why in invalid.values() if str(why).startswith("ir_drop"))
        if ir:
            lines.append(
                f"{'':<10} {ir} channels invalid for the wires' IR drop (record: converters/{cal.bank})"
            )
        others = {int(ch): str(why) for ch, why in invalid.items() if not str(why).startswith("ir_drop")}
        if others:
            shown = ", ".join(f"{ch} ({reason_kind(why)})" for ch, why in sorted(others.items())[:8])
            more = f" and {len(others) - 8} more" if len(others) > 8 else ""
            lines.append(
                f"{'':<10} invalid, passing uncorrected: channel {shown}{more} (why: the record's "
                f"converters/{cal.bank} info)"
            )
    r = record.wire_resistance
    if r is not None and r < 5e-4:  # what prints as 0.000: no drop to pre-distort for
        lines.append(f"wires      no IR drop measured ({r:.2g} ohm per segment): nothing to pre-distort for")
    elif r is not None:
        mvm = record.converters["mvm"].info
        se = mvm.get("wire_resistance_se")
        se_text = f" +- {se:.3f}" if isinstance(se, float) and np.isfinite(se) else ""
        lines.append(
            f"wires      {r:.3f}{se_text} ohm per segment (IR drop takes {100 * mvm['ir_drop_mean']:.2f} % "
            f"of the mvm tile's weights); programming targets are pre-distorted for it"
        )
    for pos, tile in sorted(record.tiles.items()):
        name = f"tile {pos} {tile.shape[0]}x{tile.shape[1]}"
        if tile.stuck is not None:
            n = tile.stuck.stuck.size
            lines.append(
                f"{name}  stuck {tile.stuck.count} of {n} devices ({tile.stuck.count / n * 100:.2f} %), "
                f"closest device {_sigmas(tile.stuck.margin)} from the threshold"
            )
        if tile.gmap is not None:
            gm = tile.gmap
            lines.append(
                f"{name}  read noise {gm.read_noise * 1e6:.4f} uS (+- {gm.read_noise_se * 1e6:.2g}), "
                f"write noise {gm.write_noise * 1e6:.3f} uS, map from {gm.reads} reads "
                f"(error {gm.read_noise / np.sqrt(gm.reads) * 1e6:.4f} uS per device)"
            )
        if tile.pulse is not None:
            pm = tile.pulse
            s = pm.summary
            gam = f"gamma {pm.gamma_up:.3f}" + ("" if pm.one_sided else f"/{pm.gamma_down:.3f}")
            steps = f"dw_up {s['dw_up_mean'] * 1e6:.4f} uS" + (
                "" if pm.one_sided else f", dw_down {s['dw_down_mean'] * 1e6:.4f} uS"
            )
            lines.append(
                f"{name}  pulse model {pm.kind}{' (one-sided)' if pm.one_sided else ''}, {gam}, {steps}, "
                f"window {s['g_min'] * 1e6:.3f}-{s['g_max'] * 1e6:.3f} uS, d2d {s['dw_min_dtod']:.2f}, "
                f"c2c {s['dw_min_ctoc']:.2f}, per-device step se {s['dw_up_rel_se_median'] * 100:.1f} %"
            )
            if s.get("plateau_held") is False:
                lines.append(
                    f"{'':<10} INVALID: the conductance did not plateau within {s['plateau_bursts']} bursts "
                    "of pulses, so the window and steps above are not the devices': every device of "
                    "this tile is marked invalid (rerun the pulse routine; a board of very fine "
                    "steps needs more pulses than the routine's bursts give)"
                )
    if record.settle is not None:
        s = record.settle.summary
        lines.append(
            f"settle     {s['steps_median']:.0f} steps (max {s['steps_max']}), "
            f"{s['converged_fraction'] * 100:.0f} % converged, {s['settle_time_s'] * 1e9:.0f} ns and "
            f"{s['energy_j']:.3g} J per sample, contraction {s['contraction_per_step']:.3f} per step"
        )
        lines.append(f"{'':<10} {_settle_advice(s)}")
    total = record.session.get("total_s")
    if total is not None:
        lines.append(f"session    {total:.1f} s")
    return "\n".join(lines)


def _settle_advice(s: dict) -> str:
    """What the settle profile says about the budget: the steps under which every settle
    converged and the max_steps to give, or that none of the budgets tried converged (a record
    written before the profile tried longer budgets says nothing)."""
    if "converged_budget" not in s:
        return "(no budget advice in this record: calibrate again for it)"
    rec, budget = s["recommended_max_steps"], s["converged_budget"]
    if rec is None or rec != rec:  # None as measured, NaN as a record stores it
        return (
            f"not every settle converged under budgets of {', '.join(map(str, s['budgets_tried']))} "
            "steps (the longest the routine tries within the board's max_settle_steps): a network "
            "that does not settle on this board, or one that needs a longer budget"
        )
    return (
        f"every settle converged within {s['converged_steps_max']} steps under a budget of {budget}: "
        f"settle budgets of networks like this one need about {rec} steps (SettleBudget.max_steps)"
    )


def _mean_trajectory(pm: PulseModel, device: int, start: float, chunks: np.ndarray, sign: int) -> np.ndarray:
    """The model's mean path from `start` under the pulse schedule (one step per pulse)."""
    lo, hi = float(pm.g_lo.reshape(-1)[device]), float(pm.g_hi.reshape(-1)[device])
    dw = float((pm.dw_up if sign > 0 else pm.dw_down).reshape(-1)[device])
    gamma = pm.gamma_up if sign > 0 else pm.gamma_down
    g, out = start, [start]
    for n in chunks:
        for _ in range(int(n)):
            u = (g - lo) / (hi - lo) if sign > 0 else (hi - g) / (hi - lo)
            step = dw * float(shape(pm.kind, np.array([min(max(u, 0.0), 1.0)]), gamma)[0])
            g = min(max(g + sign * step, lo), hi)
        out.append(g)
    return np.asarray(out)


def _pair_axes(ax: Any, cols: int) -> None:
    """Axes of a G+ | G- map drawn side by side: rows, columns of each half, a divider."""
    ax.axvline(cols - 0.5, color="k", lw=1.5)
    ax.set(ylabel="row", xlabel=f"column: G+ 0..{cols - 1} | G- {cols}..{2 * cols - 1} (G- column - {cols})")


def plot(record: CalibrationRecord, path: str | Path, tile: int = 0) -> Path:
    """Write the one-page PNG report: per-channel gain and offset, conductance and stuck maps,
    measured against fitted pulse responses, settle convergence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(16, 13))
    fig.suptitle(f"calibration of {record.identity.idn()}  ({record.created})", fontsize=12)
    ax_gain, ax_off, ax_hist = axes[0]
    for name, cal in record.converters.items():
        ch = np.arange(cal.channels)
        v = cal.valid
        # node channels (DAC, state ADC) and mvm output lines share the x axis: say which is which
        label = f"{BANK_TITLES[name]} ({'output line' if name == 'mvm' else 'node channel'})"
        ax_gain.errorbar(
            ch[v], (cal.gain[v] - 1) * 100, yerr=cal.gain_se[v] * 100, fmt=".", ms=2, lw=0.5, label=label
        )
        ax_off.errorbar(
            ch[v],
            cal.offset[v] / cal.lsb,
            yerr=cal.offset_se[v] / cal.lsb,
            fmt=".",
            ms=2,
            lw=0.5,
            label=label,
        )
    xlabel = "node channel (DAC, state ADC) / output line (mvm ADC)"
    ax_gain.set(title="per-channel gain error", xlabel=xlabel, ylabel="gain - 1 (%)")
    ax_off.set(title="per-channel offset", xlabel=xlabel, ylabel="offset (LSB of its converter)")
    for ax in (ax_gain, ax_off):
        if record.converters:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    cal_tile = record.tiles.get(tile)
    ax_map, ax_stuck, ax_pulse = axes[1]
    ax_settle, ax_noise, ax_pdist = axes[2]
    if cal_tile is not None and cal_tile.gmap is not None:
        gm = cal_tile.gmap
        im = ax_map.imshow(np.hstack((gm.mean[0], gm.mean[1])) * 1e6, aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax_map, label="uS")
        ax_map.set(title=f"conductance map, tile {tile}: G+ | G- (mean of {gm.reads} reads)")
        _pair_axes(ax_map, gm.mean.shape[2])
        ax_noise.hist(gm.std.ravel() * 1e6, bins=60, color="tab:gray")
        pooled = gm.read_noise * 1e6
        ax_noise.axvline(pooled, color="k", ls="--", label=f"pooled {pooled:.4f} uS")
        ax_noise.set(title="read noise per device", xlabel="std of reads (uS)", ylabel="devices")
        ax_noise.legend(fontsize=8)
        err = (gm.mean - gm.target) * 1e6
        if cal_tile.stuck is not None:
            err = err[~cal_tile.stuck.stuck.astype(bool)]
        ax_hist.hist(err.ravel(), bins=80, color="tab:blue")
        ax_hist.set(
            title=f"write error, working devices (write noise {gm.write_noise * 1e6:.3f} uS)",
            xlabel="mean read - target (uS)",
        )
    if cal_tile is not None and cal_tile.stuck is not None:
        st = cal_tile.stuck
        both = np.hstack((st.stuck[0], st.stuck[1]))
        ax_stuck.imshow(both, aspect="auto", cmap="Reds", interpolation="nearest")
        ax_stuck.set(title=f"stuck devices, tile {tile}: G+ | G- ({st.count})")
        _pair_axes(ax_stuck, st.stuck.shape[2])
    if cal_tile is not None and cal_tile.pulse is not None:
        pm = cal_tile.pulse
        raw = pm.raw
        dev = raw.get("device", np.array([], np.int64))
        for j in range(min(6, dev.size)):
            for key, sign in (("up", 1), ("down", -1)):
                if f"{key}_b" not in raw:
                    continue
                b = raw[f"{key}_b"][:, j]
                chunks = raw[f"{key}_chunk"]
                first = 0 if key == "up" else int(raw["up_chunk"].sum())
                x = first + np.concatenate(([0], np.cumsum(chunks)))
                line = ax_pulse.plot(x, b * 1e6, ".", ms=1.5)[0]
                model = _mean_trajectory(pm, int(dev[j]), float(b[0]), chunks, sign)
                ax_pulse.plot(x, model * 1e6, "-", lw=0.8, color=line.get_color())
        ax_pulse.set(
            title=f"pulse response, tile {tile} ({pm.kind}): measured vs fitted mean",
            xlabel="pulse number",
            ylabel="G (uS)",
        )
        v = pm.valid
        ax_pdist.hist(pm.dw_up[v].ravel() * 1e6, bins=60, alpha=0.7, label="dw_up")
        if not pm.one_sided:
            ax_pdist.hist(pm.dw_down[v].ravel() * 1e6, bins=60, alpha=0.7, label="dw_down")
        ax_pdist.set(title="fitted step per device", xlabel="dw (uS)", ylabel="devices")
        ax_pdist.legend(fontsize=8)
    if record.settle is not None:
        res = record.settle.residual
        ax_settle.semilogy(np.arange(1, res.size + 1), np.maximum(res, 1e-6))
        ax_settle.set(
            title="settle convergence (median over the batch)",
            xlabel="step",
            ylabel="max |s_t - s_(t-1)| (read-out)",
        )
        ax_settle.grid(alpha=0.3)
    # a panel whose routine did not run (a board that does not settle has no converter or
    # settle routines) says so, instead of a title over nothing
    wanted = {
        ax_gain: ("per-channel gain error", "adc, dac, mvm"),
        ax_off: ("per-channel offset", "adc, dac, mvm"),
        ax_hist: ("write error", "gmap"),
        ax_map: (f"conductance map, tile {tile}", "gmap"),
        ax_stuck: (f"stuck devices, tile {tile}", "stuck"),
        ax_pulse: (f"pulse response, tile {tile}", "pulse"),
        ax_settle: ("settle convergence", "settle"),
        ax_noise: ("read noise per device", "gmap"),
        ax_pdist: ("fitted step per device", "pulse"),
    }
    for ax, (what, routines) in wanted.items():
        if not ax.has_data() and not ax.images:
            ax.set_axis_off()
            ax.set_title("")
            ax.text(
                0.5, 0.5, f"{what}: not in this record\n(measured by {routines}; this session ran "
                f"{', '.join(record.routines)})", ha="center", va="center", transform=ax.transAxes,
                color="0.4", fontsize=9, wrap=True,
            )  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
