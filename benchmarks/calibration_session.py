"""A full calibration session on the emulator (default: one 256 x 256 tile), timed, with the
recovery of the board's hidden truth. One JSON line per (preset, seed).

    python benchmarks/calibration_session.py [--presets rram,pcm] [--seeds 0,1,2] [--tile 256]
                                     [--transport emulator|visa-tcp|serial-socket|...]
    python benchmarks/calibration_session.py --train 20 --presets rram --seeds 0,1,2 \
                                     --board "gain_error=0.05&offset_error=4"
    python benchmarks/calibration_session.py --presets rram --seeds 0 --tile 64 \
                     --board "" --board "gain_error=0.05&offset_error=4" --board "wire_resistance=0"
    python benchmarks/calibration_session.py --presets rram --seeds 0 --tile 64 --ir-baseline \
                     --board "gain_error=0.05"

With ``--train EPOCHS`` it instead calibrates the board for the 64-256-10 digits DHN (its
two tiles, 330 node channels) and trains the classifier on it twice per seed, with and
without the record applied (`calibration.CalibratedDevice`), printing the test accuracies.
With ``--deploy EPOCHS`` it trains on the ideal board and deploys the weights (write-verify)
to the calibrated board: raw, converters corrected only, and the whole record applied.

Fields: wall time of the session and of each routine; per converter bank the largest gain
error (%) and offset error (LSB) over its valid channels, their mean signed gain error (a
bias), the fraction of all channels within the issue's bounds (0.5 %, 1 LSB), the valid
channels outside them (0 is the goal) and the invalid ones counted by reason (ir_drop,
rail, imprecise, not_a_line); the wire resistance the mvm routine measured against the
board's; stuck-device precision and recall; the conductance map's RMS error over
read_noise / sqrt(reads); tile-mean pulse-response parameters against the truth.
With ``--ir-baseline`` every board is also run with ``wire_resistance=0`` (the baseline, in
the same process) and a ratio line gives the session time and the invalid channels of the
board with wires over those without.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator

import numpy as np
import torch

import calibration
import calibration.session as session_mod
from calibration import SessionOptions, run_session
from calibration.measure import tile_topology
from calibration.report import reason_kind
from drivers import Device, open_device


@contextlib.contextmanager
def device_for(transport: str, uri: str) -> Iterator[tuple[Device, object]]:
    """(device, board): the board is the emulator behind the device, for its truth."""
    if transport == "emulator":
        with open_device(uri) as dev:
            yield dev, dev.board  # type: ignore[attr-defined]
        return
    from hil.testing import serve_board

    servers = serve_board(uri)
    try:
        with open_device(servers.uri(transport)) as dev:
            yield dev, servers.device.board  # type: ignore[attr-defined]
    finally:
        servers.close()


def recovery(board, record, gmap_truth: np.ndarray, shape: tuple[int, int]) -> dict[str, object]:
    out: dict[str, object] = {}
    truths = {"dac": board.dac_errors, "adc": board.adc_errors, "mvm": board.mvm_errors}
    for bank, cal in record.converters.items():
        t = truths[bank]
        n = cal.channels
        g_err = np.abs(cal.gain / t.gain[:n].cpu().numpy() - 1)
        o_err = np.abs(cal.offset - t.offset[:n].cpu().numpy()) / cal.lsb
        out[bank] = {
            "channels": n,
            "valid": int(cal.valid.sum()),
            "gain_err_max_pct": float(np.nanmax(g_err) * 100),
            "gain_err_rms_pct": float(np.sqrt(np.nanmean(g_err**2)) * 100),
            "offset_err_max_lsb": float(np.nanmax(o_err)),
            "offset_err_rms_lsb": float(np.sqrt(np.nanmean(o_err**2))),
            "within_bounds": float(np.mean((g_err <= 0.005) & (o_err <= 1.0))),
            # the valid channels' mean signed gain error: a bias (IR drop taken for gain) shows here
            "gain_err_mean_pct": float(np.nanmean(cal.gain / t.gain[:n].cpu().numpy() - 1) * 100),
            "valid_outside_bounds": int((cal.valid & ((g_err > 0.005) | (o_err > 1.0))).sum()),
            "invalid_by_reason": _reasons(cal.info.get("invalid", {})),
        }
    mvm = record.converters.get("mvm")
    if mvm is not None:
        out["wires"] = {
            "ohms_true": board.preset.device.wire_resistance,
            "ohms_est": mvm.info.get("wire_resistance"),
            "ohms_se": mvm.info.get("wire_resistance_se"),
            "ir_drop_mean_of_mvm_tile": mvm.info.get("ir_drop_mean"),
        }
    tile = record.tiles[0]
    phys = board.tile("T0")  # the caller configured the session's device-routine layout
    assert phys.shape == shape
    truth = {k: v.cpu().numpy() for k, v in phys.truth().items()}
    if tile.stuck is not None:
        found, true = tile.stuck.stuck, truth["stuck"]
        tp = int((found & true).sum())
        out["stuck"] = {
            "true": int(true.sum()),
            "found": int(found.sum()),
            "precision": tp / int(found.sum()) if found.any() else None,
            "recall": tp / int(true.sum()) if true.any() else None,
        }
    if tile.gmap is not None:
        sigma = board.preset.device.read_noise
        err = tile.gmap.mean - gmap_truth
        bound = sigma / np.sqrt(tile.gmap.reads)
        out["gmap"] = {
            "rms_err_over_bound": float(np.sqrt(np.mean(err**2)) / bound) if bound else 0.0,
            "allowed_ratio": float(1 + 4 / np.sqrt(2 * err.size)),
            "read_noise_est_over_true": float(tile.gmap.read_noise / sigma) if sigma else 0.0,
        }
    if tile.pulse is not None:
        pm = tile.pulse
        model = board.preset.device
        v = pm.valid & ~truth["stuck"]
        rel = np.abs(pm.dw_up[v] / truth["dw_up"][v] - 1)
        p: dict[str, object] = {
            "kind": pm.kind,
            "kind_true": model.kind,
            "dw_up_tile_err_pct": float((np.mean(pm.dw_up[v]) / np.mean(truth["dw_up"][v]) - 1) * 100),
            "g_max_err_pct_of_range": float(np.mean(pm.g_hi[v] - truth["g_max"][v]) / model.g_range * 100),
            "g_min_err_pct_of_range": float(np.mean(pm.g_lo[v] - truth["g_min"][v]) / model.g_range * 100),
            "dtod_err_pct": float((pm.summary["dw_min_dtod"] / model.dw_min_dtod - 1) * 100),
            "ctoc_est": pm.summary["dw_min_ctoc"],
            "ctoc_true": model.dw_min_ctoc,
            "per_device_dw_up_median_err_pct": float(np.median(rel) * 100),
            "per_device_dw_up_within_10pct": float(np.mean(rel <= 0.1)),
        }
        if pm.one_sided:
            p["gamma_err_pct"] = float((pm.gamma_up / model.gamma - 1) * 100)
        else:
            p["dw_down_tile_err_pct"] = float(
                (np.mean(pm.dw_down[v]) / np.mean(truth["dw_down"][v]) - 1) * 100
            )
            ud = (truth["dw_up"] - truth["dw_down"]) / (truth["dw_up"] + truth["dw_down"])
            p["up_down_err_pct"] = float((pm.summary["up_down"] / np.mean(ud[v]) - 1) * 100)
        out["pulse"] = p
    return out


def _reasons(invalid: dict[str, str]) -> dict[str, int]:
    """Invalid channels counted by the kind of reason their record gives."""
    out: dict[str, int] = {}
    for why in invalid.values():
        kind = reason_kind(str(why))
        out[kind] = out.get(kind, 0) + 1
    return out


def run_one(
    preset: str,
    seed: int,
    transport: str,
    shape: tuple[int, int],
    board: str = "",
    channels: int | None = None,
) -> dict[str, object]:
    uri = f"emulator://?preset={preset}&seed={seed}" + (f"&{board}" if board else "")
    truth: list[np.ndarray] = []
    original = session_mod.conductance_map
    with device_for(transport, uri) as (dev, board):

        def spy(device, tile, shp, *args, **kwargs):
            """The session's conductance map, plus the true conductances at that moment."""
            gmap = original(device, tile, shp, *args, **kwargs)
            gp, gm = board.tile(tile).conductances(board.clock)
            truth.append(np.stack((gp.cpu().numpy(), gm.cpu().numpy())))
            return gmap

        session_mod.conductance_map = spy
        try:
            t0 = time.perf_counter()
            record = run_session(dev, SessionOptions(tile_shapes=(shape,), seed=seed, channels=channels))
            wall = time.perf_counter() - t0
        finally:
            session_mod.conductance_map = original
        dev.configure(tile_topology([shape]))
        line: dict[str, object] = {
            "preset": preset,
            "seed": seed,
            "tile": list(shape),
            "transport": transport,
            "session_s": round(wall, 2),
            "channels": record.session["options"]["channels"],
            "routines_s": {k: round(v, 2) for k, v in record.session["durations_s"].items()},
            "violations": board.safety.violations,
        }
        line.update(recovery(board, record, truth[-1], shape))
    return line


def train_comparison(uri: str, epochs: int, seeds: list[int]) -> Iterator[dict[str, object]]:
    """Digits classifier trained on the board with and without its calibration applied."""
    from hil.config import ModelConfig, RunConfig, TrainConfig
    from hil.train_classifier import train_classifier

    t0 = time.perf_counter()
    record = _calibrate_for_digits(uri)
    calibrated_s = time.perf_counter() - t0
    for seed in seeds:
        for mode in ("raw", "calibrated"):
            model = ModelConfig(sizes=[64, 256, 10])
            cfg = RunConfig(device=uri, model=model, train=TrainConfig(epochs=epochs, seed=seed))

            def opener(u: str, mode: str = mode) -> Device:
                dev = open_device(u)
                return calibration.CalibratedDevice(dev, record) if mode == "calibrated" else dev

            res = train_classifier(cfg, opener=opener)
            accs = [h.test_acc for h in res.history]
            yield {
                "uri": uri,
                "seed": seed,
                "mode": mode,
                "epochs": epochs,
                "test_acc": res.test_acc,
                "test_acc_last5_mean": float(np.mean(accs[-5:])),
                "calibration_s": round(calibrated_s, 1),
            }


def _calibrate_for_digits(uri: str) -> calibration.CalibrationRecord:
    """The record of the digits DHN's two tiles: converters and devices, less what the board
    cannot run (a board that only multiplies: stuck devices and pulse windows alone)."""
    with open_device(uri) as dev:
        wanted = session_mod.resolve_routines(("adc", "dac", "stuck", "pulse"))
        skipped = session_mod.runnable(wanted, dev.info.capabilities)
        routines = tuple(r for r in wanted if r not in skipped)
        options = SessionOptions(tile_shapes=((65, 256), (257, 10)), channels=330, routines=routines)
        return run_session(dev, options)


def deploy_comparison(uri: str, epochs: int, seeds: list[int]) -> Iterator[dict[str, object]]:
    """Digits classifier trained on the ideal board, its weights deployed to `uri`."""
    from hil.config import ModelConfig, RunConfig, TrainConfig
    from hil.data import load_dataset
    from hil.ep import EBBlock
    from hil.train_classifier import train_classifier

    ds = load_dataset("digits")
    record = _calibrate_for_digits(uri)
    for seed in seeds:
        model = ModelConfig(sizes=[64, 256, 10])
        ideal = "emulator://?preset=ideal&seed=0"
        res = train_classifier(
            RunConfig(device=ideal, model=model, train=TrainConfig(epochs=epochs, seed=seed))
        )
        block = res.model.block
        weights = {t: p.detach().clone() for t, p in block.weights.items()}
        line: dict[str, object] = {"uri": uri, "seed": seed, "epochs": epochs, "ideal_board": res.test_acc}
        for mode in ("raw", "converters_only", "calibrated"):
            dev = open_device(uri)
            if mode != "raw":
                dev = calibration.CalibratedDevice(dev, record, targets=mode == "calibrated")
            deployed = EBBlock(
                dev, block.topology, weights=weights, budgets=block.budgets, programming="verify"
            )
            line[mode] = float((deployed.predict(ds.x_test).argmax(1) == ds.y_test).float().mean())
            dev.close()
        yield line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="rram,pcm")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--transport", default="emulator")
    parser.add_argument("--train", type=int, default=0, help="epochs of the training comparison (0: off)")
    parser.add_argument("--deploy", type=int, default=0, help="epochs of the deployment comparison (0: off)")
    parser.add_argument(
        "--board",
        action="append",
        default=None,
        help="extra emulator URI parameters, e.g. 'gain_error=0.05&offset_error=4' (the bad-converter "
        "board) or 'wire_resistance=2' (IR drop); repeat for several boards (default: the preset as it is)",
    )
    parser.add_argument(
        "--channels", type=int, default=None, help="node channels (default: rows + cols; hil calibrate: 512)"
    )
    parser.add_argument(
        "--ir-baseline",
        action="store_true",
        help="also run every board with wire_resistance=0 and print the ratios (session time, invalid)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    load = os.getloadavg()[0]
    lines: list[dict[str, object]] = []
    for board in args.board or [""]:
        for preset in args.presets.split(","):
            uri = f"emulator://?preset={preset}&seed=0" + (f"&{board}" if board else "")
            if args.train or args.deploy:
                lines = (
                    train_comparison(uri, args.train, seeds)
                    if args.train
                    else deploy_comparison(uri, args.deploy, seeds)
                )
                for line in lines:
                    print(json.dumps(line), flush=True)
                continue
            for seed in seeds:
                line = run_one(preset, seed, args.transport, (args.tile, args.tile), board, args.channels)
                line["board"] = board
                print(json.dumps(line), flush=True)
                lines.append(line)
                if args.ir_baseline:
                    flat = "&".join(p for p in (board, "wire_resistance=0") if p)
                    base = run_one(preset, seed, args.transport, (args.tile, args.tile), flat, args.channels)
                    base["board"] = flat
                    print(json.dumps(base), flush=True)
                    lines.append(base)
                    lines.append(_ratio(line, base))
    print(f"# load average {load:.2f} -> {os.getloadavg()[0]:.2f}, 1 torch thread")
    for line in lines:
        print(json.dumps(line))


def _ratio(wires: dict[str, object], flat: dict[str, object]) -> dict[str, object]:
    """The board with its wires against the same board without (the baseline)."""
    out: dict[str, object] = {
        "kind": "ir_ratio",
        "preset": wires["preset"],
        "seed": wires["seed"],
        "board": wires["board"],
        "session_s_ratio": round(float(wires["session_s"]) / float(flat["session_s"]), 3),  # type: ignore[arg-type]
    }
    for bank in ("adc", "dac", "mvm"):
        a, b = wires.get(bank), flat.get(bank)
        if isinstance(a, dict) and isinstance(b, dict):
            out[f"{bank}_invalid"] = [a["channels"] - a["valid"], b["channels"] - b["valid"]]
            out[f"{bank}_gain_err_max_pct"] = [a["gain_err_max_pct"], b["gain_err_max_pct"]]
    return out


if __name__ == "__main__":
    main()
