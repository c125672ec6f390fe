"""Draw docs/figures/device_statistics.png: each preset's programming noise, read noise and
drift exponent against the conductance, measured on emulated tiles (points) next to the
published fit they follow (lines; `emulator.statistics`, `emulator.presets`).

    .venv/bin/python docs/figures/device_statistics.py

Per preset and level: one 32 x 64 tile (4096 devices) written to the level (programming
noise: std of landed - target), set exactly to it and read 4 times (read noise), and the
drift exponents drawn at that write (mean and std). No stuck devices, no window spread.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from emulator.array import TileArray
from emulator.presets import PRESETS
from emulator.statistics import pcm_nu_moments, pcm_read_std, pcm_write_std

OUT = Path(__file__).with_name("device_statistics.png")


def measure(name: str, levels: np.ndarray) -> dict[str, np.ndarray]:
    model = dataclasses.replace(PRESETS[name].device, stuck_fraction=0.0, bounds_dtod=0.0)
    out: dict[str, list[float]] = {"write": [], "read": [], "nu_mean": [], "nu_std": []}
    for k, level in enumerate(levels):
        tile = TileArray(32, 64, model, torch.Generator().manual_seed(k), torch.device("cpu"))
        target = torch.full((2, 32, 64), float(level))
        gen = torch.Generator().manual_seed(100 + k)
        tile.write_stacked(target, 0.0, gen)
        out["write"].append(float((torch.stack(tile.conductances(0.0)) - target).double().std()))
        nu = tile.truth()["nu"].double()
        out["nu_mean"].append(float(nu.mean()))
        out["nu_std"].append(float(nu.std()))
        tile.set_conductances(target[0], target[1], 0.0)
        reads = torch.stack([torch.stack(tile.read(0.0, gen)) for _ in range(4)]).double()
        out["read"].append(float((reads - level).std()))
    return {k: np.array(v) for k, v in out.items()}


def main() -> None:
    torch.set_num_threads(1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colors = {"rram": "tab:blue", "pcm": "tab:red", "ecram": "tab:green"}
    for name, color in colors.items():
        m = PRESETS[name].device
        levels = np.linspace(m.g_min + 0.04 * m.g_range, m.g_max - 0.04 * m.g_range, 12)
        got = measure(name, levels)
        us = levels * 1e6
        g = torch.tensor(levels, dtype=torch.float64)
        if m.statistics == "pcm":
            fit_write = pcm_write_std(g, m.g_max).numpy()
            fit_read = pcm_read_std(g, m.g_max, m.read_noise).numpy()
            mu, sd = (v.numpy() for v in pcm_nu_moments(g, m.g_max))
            label = f"{name}: Nandakumar et al. 2019 fit"
        else:
            fit_write = np.full_like(levels, m.write_noise)
            fit_read = np.full_like(levels, m.read_noise)
            mu, sd = np.full_like(levels, m.drift_nu), np.full_like(levels, m.drift_nu_dtod)
            label = f"{name}: preset constant"
        axes[0].plot(us, fit_write * 1e6, "-", color=color, label=label)
        axes[0].plot(us, got["write"] * 1e6, "o", color=color, ms=4, label=f"{name}: emulated")
        axes[1].plot(us, fit_read * 1e6, "-", color=color)
        axes[1].plot(us, got["read"] * 1e6, "o", color=color, ms=4)
        if m.drifts:
            axes[2].plot(us, mu, "-", color=color, label=f"{name}: mean (fit)")
            band = f"{name}: +-1 std (fit)"
            axes[2].fill_between(us, mu - sd, mu + sd, color=color, alpha=0.15, label=band)
            axes[2].errorbar(us, got["nu_mean"], yerr=got["nu_std"], fmt="o", color=color, ms=4,
                             label=f"{name}: emulated")  # fmt: skip
    axes[0].set(title="programming (write) noise", xlabel="target G (uS)", ylabel="std (uS)", yscale="log")
    axes[1].set(title="one read's noise", xlabel="G (uS)", ylabel="std (uS)", yscale="log")
    axes[2].set(title="drift exponent nu (drawn at each write)", xlabel="written G (uS)", ylabel="nu")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(OUT)


if __name__ == "__main__":
    main()
