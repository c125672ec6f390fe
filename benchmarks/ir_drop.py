"""IR drop benchmark (issue 21): what wire resistance does to a network as its tiles grow, and
what the exact solve costs.

1. Deployment: the digits classifier 64-H-10 (tiles 65 x H and (H + 1) x 10) is trained on
   the ideal board, and its weights are programmed (write-verify) onto an ideal board whose
   wires have `r` ohms per cell segment (`wire_resistance`, `emulator.ir_drop`); the test
   accuracy on the 360 held-out digits is reported per (H, r), with the RMS relative
   deviation of the effective weights from the programmed ones (the tile's IR-drop error).
   With --compensate the same weights are also deployed through `calibration.CalibratedDevice`
   with a record whose mvm routine measured the board's wire resistance (`adc,dac,mvm` on a
   64 x 64 tile, made in the same run): the targets are pre-distorted for the wires
   (`calibration.wires`). Per mode: test accuracy and the relative RMS error of the
   effective weights against the weights asked for (`raw_...`, `compensated_...`), and their
   ratio (`error_ratio`, raw over compensated: the baseline is the raw deployment of the
   same weights on the same board). `--ir-model` picks the board's IR model (default exact:
   the host's model is the attenuation map, so on an exact board compensation is approximate).
2. Cost: seconds per exact effective-conductance solve (one write of one array) per tile
   size, and the conjugate-gradient work it bounds (R^2 C); and per attenuation-model solve
   (`ir_model="attenuation"`, the default), cold and warm-started after a small change of
   the conductances (N(0, 0.25 % of the window), as between two training batches).
3. Error of the attenuation model against the exact map: random 1-10 uS tiles, 256 inputs
   uniform in [0, 1] and 256 sparse binary ones (20 % on), the relative RMS difference of
   their outputs, next to the IR drop itself (the exact outputs against ideal wires).
4. With --train: the digits classifier 64-H-10 trained in the loop on `rram` and `pcm` with
   their preset wires and without (`train_rows`).

Without --compensate this is the degradation a user sees without a record. One torch thread.

    .venv/bin/python benchmarks/ir_drop.py [--sizes 64,256,512,1023] [--ohms 0,2,8,32]
                                           [--epochs 10] [--seed 0] [--skip-deploy]
                                           [--compensate] [--ir-model exact|attenuation]
                                           [--error-sizes 16,32,64,128] [--error-ohms 0.35,2.12,8]
                                           [--cost-sizes 64,128,256] [--train]

Ends by printing one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from drivers import open_device
from emulator.ir_drop import effective_conductance, uniform_currents

# the converter routines of the compensation's session: enough to measure the wires on a 64 x 64
# tile (the board is ideal but for its wires, so the converters need few samples)
SESSION_CONVERTER = dict(levels=24, repeats=8, samples=512, reads=64, level_reads=8)


def _measure_wires(uri: str, channels: int) -> tuple[object, float]:
    """A calibration record with the mvm routine (which measures the wire resistance) for the
    board at `uri`, made on its own connection, and the session's seconds."""
    from calibration import ConverterOptions, SessionOptions, run_session

    opts = SessionOptions(
        routines=("adc", "dac", "mvm"),
        tile_shapes=((64, 64),),
        channels=channels,
        converter=ConverterOptions(**SESSION_CONVERTER),  # type: ignore[arg-type]
    )
    t0 = time.perf_counter()
    with open_device(uri) as dev:
        record = run_session(dev, opts)
    return record, time.perf_counter() - t0


def deploy_rows(
    sizes: list[int], ohms: list[float], epochs: int, seed: int, ir_model: str, compensate: bool
) -> list[dict[str, object]]:
    from calibration import CalibratedDevice
    from hil.config import ModelConfig, RunConfig, TrainConfig
    from hil.data import load_dataset
    from hil.ep import EBBlock
    from hil.train_classifier import train_classifier

    ds = load_dataset("digits")
    rows = []
    for h in sizes:
        model = ModelConfig(sizes=[64, h, 10])
        ideal = "emulator://?preset=ideal&seed=0"
        t0 = time.perf_counter()
        cfg = RunConfig(device=ideal, model=model, train=TrainConfig(epochs=epochs, seed=seed))
        res = train_classifier(cfg)
        train_s = time.perf_counter() - t0
        block = res.model.block
        weights = {t: p.detach().clone() for t, p in block.weights.items()}
        nodes = sum(block.topology.groups.values())
        for r in ohms:
            uri = f"emulator://?preset=ideal&seed=0&wire_resistance={r}&ir_model={ir_model}"
            line: dict[str, object] = {
                "bench": "ir_drop",
                "kind": "deploy",
                "hidden": h,
                "tiles": {t: list(w.shape) for t, w in weights.items()},
                "wire_ohms": r,
                "ir_model": ir_model,
                "ideal_board_acc": res.test_acc,
                "train_s": round(train_s, 1),
            }
            errors: dict[str, dict[str, float]] = {}
            for mode in ("raw", "compensated") if compensate else ("raw",):
                dev = open_device(uri)
                if mode == "compensated":
                    record, session_s = _measure_wires(uri, nodes)
                    line["wire_ohms_measured"] = record.wire_resistance  # type: ignore[attr-defined]
                    line["session_s"] = round(session_s, 2)
                    dev = CalibratedDevice(dev, record)  # type: ignore[arg-type]
                t0 = time.perf_counter()
                deployed = EBBlock(
                    dev, block.topology, weights=weights, budgets=block.budgets, programming="verify"
                )
                acc = float((deployed.predict(ds.x_test).argmax(1) == ds.y_test).float().mean())
                line[f"{mode}_deploy_s"] = round(time.perf_counter() - t0, 2)
                line[f"{mode}_test_acc"] = acc
                # the effective weights (what the mvm and the settles see) against the weights the
                # host asked for, per tile (board internals: this is the emulator)
                board = dev.inner.board if mode == "compensated" else dev.board  # type: ignore[attr-defined]
                err = {}
                plain_err = {}
                for t, w in weights.items():
                    tile = board.tile(t)
                    c = block.topology.coupling(t)
                    want = w.clamp(-c.w_max, c.w_max)
                    eff = tile.weights(board.clock) * c.w_max
                    err[t] = float((eff - want).norm() / want.norm())
                    g = tile.state(board.clock)
                    plain = (g[0] - g[1]) / tile.model.g_range
                    plain_err[t] = float((tile.weights(board.clock) - plain).norm() / plain.norm())
                line[f"{mode}_weight_rel_error"] = err
                errors[mode] = err
                if mode == "raw":
                    # the tiles' IR-drop error alone: effective weights against (G+ - G-) / range
                    line["weight_rel_error"] = plain_err
                dev.close()
            if compensate:
                line["error_ratio"] = {
                    t: errors["raw"][t] / max(errors["compensated"][t], 1e-12) for t in weights
                }
            line["test_acc"] = line["raw_test_acc"]
            print(json.dumps(line), flush=True)
            rows.append(line)
    return rows


def cost_rows(sizes: list[int], r: float) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        g = torch.rand((n, n), generator=torch.Generator().manual_seed(n)) * 9e-6 + 1e-6
        t0 = time.perf_counter()
        m = effective_conductance(g, r)
        dt = time.perf_counter() - t0
        line = {
            "bench": "ir_drop",
            "kind": "cost",
            "tile": [n, n],
            "wire_ohms": r,
            "solve_s": round(dt, 3),
            "work_r2c": n * n * n,
            "current_lost": float(1 - m.double().sum() / g.double().sum()),
        }
        print(json.dumps(line), flush=True)
        rows.append(line)
    return rows


def train_rows(sizes: list[int], seeds: list[int], epochs: int) -> list[dict[str, object]]:
    """The digits classifier 64-H-10 trained in the loop on `rram` and `pcm` (board seed 0) at
    their preset wire resistance and with ``wire_resistance=0``: test accuracy per training seed."""
    from hil.config import ModelConfig, RunConfig, TrainConfig
    from hil.train_classifier import train_classifier

    rows = []
    for h in sizes:
        for preset in ("rram", "pcm"):
            for seed in seeds:
                for wires in ("&wire_resistance=0", ""):
                    uri = f"emulator://?preset={preset}&seed=0{wires}"
                    cfg = RunConfig(
                        device=uri,
                        model=ModelConfig(sizes=[64, h, 10]),
                        train=TrainConfig(epochs=epochs, seed=seed),
                    )
                    t0 = time.perf_counter()
                    res = train_classifier(cfg)
                    line = {
                        "bench": "ir_drop",
                        "kind": "train",
                        "hidden": h,
                        "device": uri,
                        "seed": seed,
                        "epochs": epochs,
                        "test_acc": res.test_acc,
                        "s_per_epoch": round((time.perf_counter() - t0) / epochs, 2),
                    }
                    print(json.dumps(line), flush=True)
                    rows.append(line)
    return rows


def attenuation_cost_rows(shapes: list[tuple[int, int]], r: float) -> list[dict[str, object]]:
    rows = []
    for n, m in shapes:
        gen = torch.Generator().manual_seed(n * m)
        g = torch.rand((n, m), generator=gen) * 9e-6 + 1e-6
        t0 = time.perf_counter()
        x, u, cold_iters = uniform_currents(g, r)
        cold = time.perf_counter() - t0
        g2 = (g + 0.0025 * 9e-6 * torch.randn((n, m), generator=gen)).clamp(1e-6, 10e-6)
        t0 = time.perf_counter()
        _, _, warm_iters = uniform_currents(g2, r, u)
        warm = time.perf_counter() - t0
        line = {
            "bench": "ir_drop",
            "kind": "attenuation_cost",
            "tile": [n, m],
            "wire_ohms": r,
            "cold_s": round(cold, 4),
            "cold_iterations": cold_iters,
            "warm_s": round(warm, 4),
            "warm_iterations": warm_iters,
            "current_lost": float(1 - x.double().sum() / g.double().sum()),
        }
        print(json.dumps(line), flush=True)
        rows.append(line)
    return rows


def error_rows(sizes: list[int], ohms: list[float]) -> list[dict[str, object]]:
    rows = []
    for n in sizes:
        for r in ohms:
            gen = torch.Generator().manual_seed(n)
            g = torch.rand((n, n), generator=gen, dtype=torch.float64) * 9e-6 + 1e-6
            exact = effective_conductance(g, r).double()
            approx = uniform_currents(g, r)[0].double()
            dense = torch.rand((256, n), generator=gen, dtype=torch.float64)
            line: dict[str, object] = {"bench": "ir_drop", "kind": "attenuation_error", "tile": [n, n]}
            line["wire_ohms"] = r
            for name, v in (("dense", dense), ("sparse", (dense < 0.2).double())):
                want = v @ exact
                line[f"{name}_model_error"] = float((v @ approx - want).norm() / want.norm())
                line[f"{name}_ir_drop"] = float((v @ g - want).norm() / want.norm())
            print(json.dumps(line), flush=True)
            rows.append(line)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,512,1023")
    parser.add_argument("--ohms", default="0,2,8,32")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost-sizes", default="64,128,256")
    parser.add_argument("--error-sizes", default="16,32,64,128")
    parser.add_argument("--error-ohms", default="0.35,2.12,8")
    parser.add_argument("--skip-deploy", action="store_true", help="only the cost and error rows")
    parser.add_argument(
        "--compensate",
        action="store_true",
        help="also deploy through a calibration record that measured the wires (host-side compensation)",
    )
    parser.add_argument("--ir-model", default="exact", choices=("exact", "attenuation"))
    parser.add_argument(
        "--train", action="store_true", help="also train on rram / pcm with and without wires"
    )
    parser.add_argument("--train-sizes", default="64,256,1023")
    parser.add_argument("--train-seeds", default="0,1,2")
    parser.add_argument("--train-epochs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(v) for v in args.sizes.split(",")]
    ohms = [float(v) for v in args.ohms.split(",")]
    load = os.getloadavg()[0]
    rows = (
        []
        if args.skip_deploy
        else deploy_rows(sizes, ohms, args.epochs, args.seed, args.ir_model, args.compensate)
    )
    rows += error_rows(
        [int(v) for v in args.error_sizes.split(",")], [float(v) for v in args.error_ohms.split(",")]
    )
    if args.train:
        rows += train_rows(
            [int(v) for v in args.train_sizes.split(",")],
            [int(v) for v in args.train_seeds.split(",")],
            args.train_epochs,
        )
    shapes = [(64, 64), (128, 128), (256, 256), (785, 512), (1024, 1024)]
    rows += attenuation_cost_rows(shapes, 2.12)
    rows += cost_rows([int(v) for v in args.cost_sizes.split(",")], 2.0)
    print(f"# load average {load:.2f} -> {os.getloadavg()[0]:.2f}, 1 torch thread")
    for line in rows:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
