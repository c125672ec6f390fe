"""Benchmark (issue 17): one EP training step (784-512-10, batch 128, T1 = 30 free steps,
T2 = 10 + 10 centered nudged steps, fixed step counts, one torch thread) on the 5000 real
28x28 MNIST images of ``mnist5k`` (the optional extra ``xbar-hil[data]``), four ways,
interleaved in one process:

(a) ``formulation``: the per-step autograd formulation of the published EP code (Scellier &
    Bengio 2017; the "Scaling EP" code of Laborieux et al. 2021), written here: the primitive
    function Phi is built and differentiated by autograd at every step to get the state
    update, the input layer's product is recomputed every step, states are batch-first,
    weights in ``nn.Linear`` layout; the +beta and -beta phases settle one after the other
    from the free state; the weight update is autograd of ``-(Phi(s+) - Phi(s-)) / 2 beta``,
    then SGD. Two things follow the project instead of that code, so that the three compute
    the same numbers: the relaxation ``s <- s + dt (rho(dPhi/ds) - s)`` with the project's dt
    (the published code takes dt = 1) and the cross-entropy nudge as the project applies it
    (the loss gradient at the free state, ``tau (softmax(tau s) - onehot)``, injected as a
    constant current: ``Phi -= beta current . s_out``). The ones vector autograd is seeded
    with is made once per settle (the published code builds it every step): if anything that
    flatters the formulation.
(b) ``floor``: a tight plain-torch loop in the board's layout (`emulator.board`: the free
    states as one (nodes, batch) buffer, per step one ``addmm`` per destination group written
    into its rows, one clamp and one in-place ``lerp`` over all nodes; weights as the tiles
    store them, (rows + bias row, cols)), with the clamped input's product hoisted out of the
    loop and computed once per batch for all phases, the two nudged phases settled as one over
    the doubled batch as the project does, the update and SGD in place.
(c) ``project``: `hil.classifier.Classifier.step` on ``emulator://?preset=ideal&seed=0``
    (configured with the same sizes, steps, beta, tau, dt and learning rates), and the same
    on ``preset=rram`` at equal step counts (the convergence check is moved to the last step
    so no settle stops early).

The three start from the same weights (what the ideal board holds after its first
programming) and first run one step on the same batch: the free states and weight gradients
of (a), (b) and (c) are compared and reported (``check_*``: max abs differences, relative to
the largest entry for gradients), so the timings cannot drift into measuring different work.
``tests/test_peer_ep.py`` asserts the same at small sizes.

Timing: each repeat runs every implementation in turn, in an order rotated per repeat, so
load from other processes hits all alike; each runs `--run` consecutive batches (default 4;
the same batches for all). The headline figures are the warm steps, the second to the last
of each run (their mean per repeat): a step right after a step of its own, as in training.
The first step of each run, right after another implementation's work (the Xeon's L2 cache
is 2 MiB a core, 4 MiB over its 2; one tile's conductance pair alone is 3.1 MiB), is reported under ``cold``.
A one-step rotation (``--run 1``, what this benchmark did before 2026-12-07) measures only
cold steps: on the Xeon at load 0.8 (2026-12-07, 20:57 UTC, one thread, code of 511b4d2) the
project's step took 15.5 ms run back to back and 27-31 ms right after a formulation step,
the floor's 7.9 and 9.4-10.2 ms. The figures are medians over repeats (ms per batch), the
ratios medians of the per-repeat ratios (``*_quartiles``: their 25 % and 75 % quartiles, how
far the load moved them).
``rram_over_ideal_without_programming``
is the same ratio with each step's programming time taken out of both. ``programming_share`` is the
time of the project's per-batch programming (`EBBlock.sync` when it writes tiles) over its
whole ideal step, measured in the same steps. The writes cost the emulated board more than
that: the next settle first brings the board's settle plan up to the new conductances
(``plan_refresh_ms``: the weights recomputed from them, the line conductances, the
coupling-norm bound; `time_programming`), and ``programming_with_refresh_share`` counts it
in.

Measured on: a shared machine with 2 cores and other agents' jobs on it (load average
about 2-3 during the runs), one torch thread, torch CPU build; numbers move by 10-30 %
between runs there, ratios much less.

    python benchmarks/peer_ep.py [--repeats 15] [--quick] [--device cpu|cuda] [--hidden 512]
    python benchmarks/peer_ep.py --device cuda --hidden 4096 --skip-rram \
        --ideal-uri 'emulator://?preset=ideal&seed=0&tile_cols_max=4096&tile_rows_max=4097&channels=8192'

(the second: the 4096-wide network on a GPU, on a board with tiles and converters wide enough
for it; docs/programming.md has both on an H200.)

Ends by printing one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drivers import SettleBudget, open_device
from hil.classifier import Classifier
from hil.config import RunConfig, load_config

IDEAL = "emulator://?preset=ideal&seed=0"
# IR drop off: the rram figures measure the noise draws and stuck-device bookkeeping issue 17
# is about; a preset with wire resistance adds a resistor-network solve per write
# (`emulator.ir_drop`), which `--rram-uri emulator://?preset=rram&seed=0` measures as well
RRAM = "emulator://?preset=rram&seed=0&wire_resistance=0"


def rho(u: Tensor, gain: float) -> Tensor:
    """The board's activation, ``clamp(gain u, 0, 1)``."""
    return (u * gain).clamp_(0.0, 1.0) if gain != 1.0 else u.clamp(0.0, 1.0)


def ce_current(out: Tensor, y: Tensor, tau: float, classes: int) -> Tensor:
    """dL/ds_out of the cross-entropy of ``softmax(tau s_out)`` (the nudge current), (B, classes)."""
    return tau * (torch.softmax(tau * out, 1) - F.one_hot(y, classes).to(out.dtype))


# ----------------------------------------------------------------------- (a) the formulation
class Formulation:
    """The per-step autograd EP formulation of the published EP code (see the module
    docstring), on a layered network ``sizes``; the weights come in the board's tile layout
    ((fan-in + bias row, fan-out)) and are kept as ``nn.Linear`` synapses."""

    def __init__(
        self, tiles: list[Tensor], *, lrs: list[float], beta: float, tau: float, dt: float, gain: float,
        t1: int, t2: int, device: str = "cpu",
    ) -> None:  # fmt: skip
        self.synapses = nn.ModuleList()
        for w in tiles:
            lin = nn.Linear(w.shape[0] - 1, w.shape[1], bias=True)
            with torch.no_grad():
                lin.weight.copy_(w[:-1].T)
                lin.bias.copy_(w[-1])
            self.synapses.append(lin)
        self.synapses.to(device)
        groups = [{"params": list(s.parameters()), "lr": lrs[min(k, len(lrs) - 1)]}
                  for k, s in enumerate(self.synapses)]  # fmt: skip
        self.opt = torch.optim.SGD(groups)
        self.beta, self.tau, self.dt, self.gain, self.t1, self.t2 = beta, tau, dt, gain, t1, t2
        self.device = device

    def phi(self, x: Tensor, neurons: list[Tensor], beta: float, current: Tensor | None) -> Tensor:
        """Phi per sample: ``sum_k s_{k+1} . (W_k s_k + b_k)`` (the input layer's product
        recomputed at every call) minus ``beta`` times the cost ``current . s_out``."""
        layers = [x, *neurons]
        phi = 0.0
        for k, syn in enumerate(self.synapses):
            phi = phi + (syn(layers[k]) * layers[k + 1]).sum(1)
        if beta != 0.0 and current is not None:
            phi = phi - beta * (current * layers[-1]).sum(1)
        return phi  # type: ignore[return-value]

    def relax(
        self, x: Tensor, neurons: list[Tensor], steps: int, beta: float = 0.0, current: Tensor | None = None
    ) -> list[Tensor]:
        seed = torch.ones(x.shape[0], device=x.device)
        for _ in range(steps):
            phi = self.phi(x, neurons, beta, current)
            grads = torch.autograd.grad(phi, neurons, grad_outputs=seed)
            neurons = [
                torch.lerp(s.detach(), rho(g, self.gain), self.dt).requires_grad_()
                for s, g in zip(neurons, grads, strict=True)
            ]
        return neurons

    def step(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """One batch: free phase, +beta and -beta phases from the free state, the EP update.
        Returns (free states per free layer, the weight gradients in tile layout)."""
        b = x.shape[0]
        neurons = [torch.zeros(b, s.out_features, device=x.device, requires_grad=True) for s in self.synapses]
        free = self.relax(x, neurons, self.t1)
        current = ce_current(free[-1].detach(), y, self.tau, self.synapses[-1].out_features)
        copy = [s.detach().clone().requires_grad_() for s in free]
        plus = self.relax(x, copy, self.t2, self.beta, current)
        copy = [s.detach().clone().requires_grad_() for s in free]
        minus = self.relax(x, copy, self.t2, -self.beta, current)
        self.opt.zero_grad(set_to_none=True)
        phi_p = self.phi(x, plus, self.beta, current).mean()
        phi_m = self.phi(x, minus, -self.beta, current).mean()
        delta = -(phi_p - phi_m) / (2 * self.beta)
        delta.backward()
        grads = [torch.cat([s.weight.grad.T, s.bias.grad[None]]).detach().clone() for s in self.synapses]
        self.opt.step()
        return [s.detach() for s in free], grads


# ------------------------------------------------------------------------------- (b) the floor
class Floor:
    """Plain torch in the board's layout: states (nodes, batch) in one buffer, the tiles as
    the board stores them, the input product computed once per batch (see the module
    docstring). A layered network with one clamped input layer."""

    def __init__(
        self, tiles: list[Tensor], *, lrs: list[float], beta: float, tau: float, dt: float, gain: float,
        t1: int, t2: int, device: str = "cpu",
    ) -> None:  # fmt: skip
        self.w = [w.detach().clone().to(device) for w in tiles]
        self.lrs = [lrs[min(k, len(lrs) - 1)] for k in range(len(tiles))]
        self.beta, self.tau, self.dt, self.gain, self.t1, self.t2 = beta, tau, dt, gain, t1, t2
        self.sizes = [tiles[0].shape[0] - 1] + [w.shape[1] for w in tiles]
        n, start = self.sizes[1:], 0
        self.rows = []
        for k in n:
            self.rows.append(slice(start, start + k))
            start += k
        self.nodes = start

    def _settle(self, state: Tensor, const: Tensor, steps: int) -> None:
        """`steps` damped fixed-point steps on `state` (nodes, batch) with the constant drive
        `const` (nodes, batch): per free layer k, ``new_k = const_k + W_k s_{k-1} + W_{k+1}^T s_{k+1}``
        (the input's product is in `const`), then clamp and relax, in place."""
        new = torch.empty_like(state)
        rows, w = self.rows, self.w
        links = []  # (destination rows, [(matrix (n_dst, n_src), source rows of state)])
        for k, r in enumerate(rows):
            src = []
            if k > 0:  # from below: s_{k-1} through W_k's weight rows, transposed
                src.append((w[k][:-1].T, state[rows[k - 1]]))
            if k + 1 < len(rows):  # from above: s_{k+1} through W_{k+1}'s weight rows
                src.append((w[k + 1][:-1], state[rows[k + 1]]))
            links.append((r, src))
        ops: list[Callable[[], object]] = []
        for r, src in links:
            (m0, x0), *more = src
            ops.append(lambda r=r, m0=m0, x0=x0: torch.addmm(const[r], m0, x0, out=new[r]))
            ops += [lambda r=r, m=m, x=x: new[r].addmm_(m, x) for m, x in more]
        gain, dt = self.gain, self.dt
        for _ in range(steps):
            for op in ops:
                op()
            if gain != 1.0:
                new.mul_(gain)
            new.clamp_(0.0, 1.0)
            state.lerp_(new, dt)

    def step(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        b, w, rows = x.shape[0], self.w, self.rows
        const = torch.empty(self.nodes, b, device=x.device)
        torch.addmm(w[0][-1:].T, w[0][:-1].T, x.T, out=const[rows[0]])  # hoisted: once per batch
        for k in range(1, len(rows)):
            const[rows[k]] = w[k][-1:].T
        state = torch.zeros(self.nodes, b, device=x.device)
        self._settle(state, const, self.t1)
        free = [state[r].T for r in rows]
        current = ce_current(free[-1], y, self.tau, self.sizes[-1]).T  # (classes, B)
        # both nudged phases as one settle over the doubled batch: -beta current | +beta current
        const2 = torch.cat([const, const], 1)
        const2[rows[-1], :b].sub_(current, alpha=self.beta)
        const2[rows[-1], b:].add_(current, alpha=self.beta)
        both = torch.cat([state, state], 1)
        self._settle(both, const2, self.t2)
        sp, sm = both[:, :b], both[:, b:]
        scale = -1.0 / (2 * self.beta * b)
        grads = []
        for k, wk in enumerate(w):
            dc = sp[rows[k]] - sm[rows[k]]  # (n_k, B)
            g = torch.empty_like(wk)
            if k == 0:
                torch.mm(x.T, dc.T, out=g[:-1])
            else:
                torch.mm(sp[rows[k - 1]], sp[rows[k]].T, out=g[:-1])
                g[:-1].addmm_(sm[rows[k - 1]], sm[rows[k]].T, alpha=-1.0)
            g[-1] = dc.sum(1)
            g.mul_(scale)
            grads.append(g)
            wk.sub_(g, alpha=self.lrs[k])
        return [s.clone() for s in free], grads


# ---------------------------------------------------------------------------- (c) the project
def project_config(
    uri: str, sizes: list[int], batch: int, t1: int, t2: int, compute: str = "cpu"
) -> RunConfig:
    return load_config(
        None,
        [
            f"device={uri}",
            f"compute={compute}",
            "data.name=mnist5k",
            f"model.sizes=[{','.join(map(str, sizes))}]",
            f"train.batch_size={batch}",
            f"ep.free_steps={t1}",
            f"ep.nudge_steps={t2}",
            "ep.tol=0.0",
            "ep.mode=centered",
            "ep.loss=ce",
            "model.activation=hard_sigmoid",  # the formulation and the floor clamp
        ],
    )


def project(uri: str, sizes: list[int], batch: int, t1: int, t2: int, compute: str = "cpu") -> Classifier:
    """A `Classifier` on `uri` whose settles all run their full step budget: tol 0 and the one
    convergence check at the last step (a noisy board otherwise stops a settle whose residual
    is within its noise floor). `compute`: the run's compute device (config key ``compute``):
    the host stack and the in-process board run there."""
    cfg = project_config(uri, sizes, batch, t1, t2, compute)
    clf = Classifier(cfg, sizes[0], sizes[-1], open_device)
    blk = clf.block
    dt = cfg.ep.dt
    blk.budgets = {
        "free": SettleBudget(max_steps=t1, tol=0.0, dt=dt, check_every=t1),
        "nudge": SettleBudget(max_steps=t2, tol=0.0, dt=dt, check_every=t2),
    }
    return clf


def board_tiles(clf: Classifier) -> list[Tensor]:
    """The weights the (emulated) board settles with, per tile, (rows + bias row, cols)."""
    board = clf.block.device.board  # type: ignore[attr-defined]
    return [board.tile(t).weights(board.clock).detach().clone() for t in clf.block.weights]


def peers(clf: Classifier, device: str = "cpu") -> tuple[Formulation, Floor]:
    """(a) and (b) with the project's hyper-parameters, from the weights its board holds."""
    e, t = clf.cfg.ep, clf.cfg.train
    kw = dict(lrs=list(t.lr), beta=e.beta, tau=e.tau, dt=e.dt, gain=clf.cfg.model.gain,
              t1=e.free_steps, t2=e.nudge_steps, device=device)  # fmt: skip
    tiles = [w.to(device) for w in board_tiles(clf)]
    return Formulation(tiles, **kw), Floor(tiles, **kw)  # type: ignore[arg-type]


def project_step(clf: Classifier, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """`Classifier.step`, then (free states per free layer, the weight gradients it applied)."""
    clf.step(x, y)
    blk = clf.block
    free = [blk.as_tensor(clf.last_settles["free"].states[g]) for g in blk.free_groups]
    return free, [p.grad.detach().clone() for p in blk.weights.values()]


def compare(
    a: tuple[list[Tensor], list[Tensor]], b: tuple[list[Tensor], list[Tensor]]
) -> tuple[float, float]:
    """(max abs difference of the free states, max abs difference of the gradients relative
    to their largest entry) between two steps' outputs."""
    ds = max(float((u.cpu() - v.cpu()).abs().max()) for u, v in zip(a[0], b[0], strict=True))
    dg = max(
        float((u.cpu() - v.cpu()).abs().max()) / max(float(v.abs().max()), 1e-30)
        for u, v in zip(a[1], b[1], strict=True)
    )
    return ds, dg


def check_same_work(clf: Classifier, x: Tensor, y: Tensor, device: str = "cpu") -> dict[str, float]:
    """One step of (a), (b) and the project from the same weights on the same batch: the
    differences of their free states and gradients (see `compare`). Takes a fresh `clf`
    (it is stepped)."""
    form, floor = peers(clf, device)
    xd, yd = x.to(device), y.to(device)
    ra, rb = form.step(xd, yd), floor.step(xd, yd)
    rc = project_step(clf, x, y)
    (s_ab, g_ab), (s_bc, g_bc) = compare(ra, rb), compare(rc, rb)
    return {"state_a_b": s_ab, "grad_a_b": g_ab, "state_project_b": s_bc, "grad_project_b": g_bc}


# ------------------------------------------------------------------------------------ timing
def time_programming(clf: Classifier, acc: dict[str, float]) -> None:
    """Add to ``acc["sync"]`` the time of `clf`'s per-batch programming (`EBBlock.sync` when it
    writes tiles), and to ``acc["refresh"]`` the time its in-process board then takes to bring
    its settle plan up to the new conductances (`SettlePlanner.plan` when the tiles' weights
    changed since the plan's last use: the weights recomputed from the conductances, the line
    conductances, the coupling-norm bound), which the first settle after the writes pays. A
    board in another process has no plan here: its refresh figure stays 0."""
    blk = clf.block
    plain_sync = blk.sync

    def timed_sync(force: bool = False) -> int:
        t = time.perf_counter()
        n = plain_sync(force)
        if n:
            acc["sync"] += time.perf_counter() - t
        return n

    blk.sync = timed_sync  # type: ignore[method-assign]
    board = getattr(blk.device, "board", None)
    if board is None:
        return
    planner = board.engine.planner
    plain_plan = planner.plan

    def timed_plan(clamped: frozenset[str]) -> object:
        cached = planner.plans.get(clamped)
        before = None if cached is None else cached[1].epochs
        t = time.perf_counter()
        plan = plain_plan(clamped)
        if before is not None and plan.epochs != before:
            acc["refresh"] += time.perf_counter() - t
        return plan

    planner.plan = timed_plan  # type: ignore[method-assign]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15, help="timed batches per implementation")
    ap.add_argument("--quick", action="store_true", help="3 repeats")
    ap.add_argument("--device", default="cpu", help="where (a) and (b) run, and the emulator's torch device")
    ap.add_argument("--hidden", type=int, default=512, help="hidden layer width (784-H-10)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--t1", type=int, default=30)
    ap.add_argument("--t2", type=int, default=10)
    ap.add_argument(
        "--run",
        type=int,
        default=4,
        help="consecutive batches each implementation runs per round: the first is timed as 'cold' "
        "(right after another implementation's step), the rest as the headline, warm figures "
        "(after its own step, as in training); 1: one step per round, every figure cold",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings)")
    ap.add_argument("--skip-rram", action="store_true")
    ap.add_argument("--rram-uri", default=RRAM, help="the rram line's board (default: rram, IR drop off)")
    ap.add_argument(
        "--ideal-uri",
        default=IDEAL,
        help="the project's ideal board; a hidden layer wider "
        "than 1024 needs wider tiles, e.g. emulator://?preset=ideal&seed=0&tile_cols_max=4096",
    )
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: this torch has no CUDA device (build {torch.__version__})")
    for flag, value, most in (
        ("--repeats", a.repeats, 1000),
        ("--run", a.run, 100),
        ("--threads", a.threads, 256),
    ):
        if not 1 <= value <= most:
            ap.error(f"{flag} {value}: give a whole number from 1 to {most}")
    torch.set_num_threads(a.threads)
    repeats = 3 if a.quick else a.repeats
    sizes, bs, t1, t2, dev = [784, a.hidden, 10], a.batch, a.t1, a.t2, a.device
    from hil.data import load_dataset

    ds = load_dataset("mnist5k")
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds.x_train), generator=gen)
    n_batches = len(order) // bs

    def batch(k: int) -> tuple[Tensor, Tensor]:
        idx = order[(k % n_batches) * bs : (k % n_batches + 1) * bs]
        return ds.x_train[idx], ds.y_train[idx]

    # the project's compute device (config key `compute`): its host stack and the in-process
    # emulator run there, the step's tensors stay there (hil.compute)
    compute = dev
    if compute != "cpu":
        try:
            project(a.ideal_uri, sizes, bs, t1, t2, compute).step(*batch(0))
        except Exception as exc:  # reported; then the project runs on the CPU
            print(f"project on {dev} failed ({type(exc).__name__}: {exc}); the project runs on the cpu",
                  file=sys.stderr, flush=True)  # fmt: skip
            compute = "cpu"
    load_start = os.getloadavg()
    # the same computation, checked on a fresh board before any timing
    x0, y0 = batch(0)
    check = check_same_work(project(a.ideal_uri, sizes, bs, t1, t2, compute), x0, y0, dev)
    print(f"check (max differences after one step): {check}", file=sys.stderr, flush=True)

    ideal = project(a.ideal_uri, sizes, bs, t1, t2, compute)
    form, floor = peers(ideal, dev)
    rram = None if a.skip_rram else project(a.rram_uri, sizes, bs, t1, t2, compute)
    prog = {"sync": 0.0, "refresh": 0.0}
    time_programming(ideal, prog)
    if rram is not None:
        time_programming(rram, prog)
    steps: dict[str, list[float]] = {}

    def run_project(clf: Classifier, name: str) -> Callable[[Tensor, Tensor], object]:
        def go(x: Tensor, y: Tensor) -> object:
            _loss, _acc, st = clf.step(x, y)
            steps.setdefault(name, []).append(st["free_steps"] + st["nudge_steps"])
            return st

        return go

    impls: dict[str, Callable[[Tensor, Tensor], object]] = {
        "formulation": lambda x, y: form.step(x.to(dev), y.to(dev)),
        "floor": lambda x, y: floor.step(x.to(dev), y.to(dev)),
        "project": run_project(ideal, "project"),
    }
    if rram is not None:
        impls["rram"] = run_project(rram, "rram")
    names = list(impls)
    run = a.run
    # per round and implementation: the first step of its run (cold: after another one's
    # work), the mean of the others (warm: after its own step, as in training), and the
    # programming and plan-refresh times of each
    cold: dict[str, list[float]] = {n: [] for n in names}
    ms: dict[str, list[float]] = {n: [] for n in names}
    prog_ms: dict[str, list[float]] = {"project": [], "rram": []}
    refresh_ms: dict[str, list[float]] = {"project": [], "rram": []}
    prog_cold: dict[str, list[float]] = {"project": [], "rram": []}
    refresh_cold: dict[str, list[float]] = {"project": [], "rram": []}
    warm = 2
    for k in range(warm + repeats):
        rot = k % len(names)
        for name in names[rot:] + names[:rot]:
            times, progs, refreshes = [], [], []
            for j in range(run):
                x, y = batch(1 + k * run + j)  # the same batches for every implementation
                prog["sync"] = prog["refresh"] = 0.0
                sync(dev)
                t = time.perf_counter()
                impls[name](x, y)
                sync(dev)
                times.append(1e3 * (time.perf_counter() - t))
                progs.append(1e3 * prog["sync"])
                refreshes.append(1e3 * prog["refresh"])
            if k < warm:
                continue
            cold[name].append(times[0])
            ms[name].append(statistics.fmean(times[1:]) if run > 1 else times[0])
            if name in prog_ms:
                prog_cold[name].append(progs[0])
                refresh_cold[name].append(refreshes[0])
                prog_ms[name].append(statistics.fmean(progs[1:]) if run > 1 else progs[0])
                refresh_ms[name].append(statistics.fmean(refreshes[1:]) if run > 1 else refreshes[0])
        print(f"  repeat {k + 1}/{warm + repeats}: " + ", ".join(
            f"{n} {ms[n][-1]:.1f} ms (cold {cold[n][-1]:.1f})" for n in names if ms[n]),
            file=sys.stderr, flush=True)  # fmt: skip

    def med(n: str, of: dict[str, list[float]] = ms) -> float:
        return round(statistics.median(of[n]), 2)

    def ratio(n: str, d: str, of: dict[str, list[float]] = ms) -> float:
        return round(statistics.median(p / q for p, q in zip(of[n], of[d], strict=True)), 3)

    def spread(n: str, d: str, of: dict[str, list[float]] = ms) -> list[float]:
        """The quartiles (25 %, 75 %) of the per-repeat ratios `n` / `d`: how far load moved them."""
        r = [p / q for p, q in zip(of[n], of[d], strict=True)]
        if len(r) < 2:
            return [round(r[0], 3)] * 2 if r else []
        q = statistics.quantiles(r, n=4)
        return [round(q[0], 3), round(q[2], 3)]

    def share(
        prog_of: dict[str, list[float]], refresh_of: dict[str, list[float]] | None, of: dict[str, list[float]]
    ) -> float:
        """The median over rounds of the project's programming (and plan refresh) over its step."""
        return round(statistics.median(
            (p + (refresh_of["project"][i] if refresh_of else 0.0)) / of["project"][i]
            for i, p in enumerate(prog_of["project"])), 3)  # fmt: skip

    def without_programming(of: dict[str, list[float]], prog_of: dict[str, list[float]]) -> float:
        return round(statistics.median(
            (r - pr) / (i - pi) for r, pr, i, pi in zip(of["rram"], prog_of["rram"], of["project"],
                                                        prog_of["project"], strict=True)), 3)  # fmt: skip

    common = {"sizes": sizes, "batch": bs, "T1": t1, "T2": f"{t2}+{t2}", "device": dev,
              "project_device": compute, "threads": a.threads, "repeats": repeats,
              "cpus": os.cpu_count(), "run": run,
              "load_avg_1min_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)]}  # fmt: skip
    out = [
        {
            "bench": "peer_ep", "preset": "ideal", "uri": a.ideal_uri, **common,
            "formulation_ms": med("formulation"), "project_ms": med("project"), "floor_ms": med("floor"),
            "formulation_over_project": ratio("formulation", "project"),
            "project_over_floor": ratio("project", "floor"),
            "formulation_over_project_quartiles": spread("formulation", "project"),
            "project_over_floor_quartiles": spread("project", "floor"),
            "programming_ms": med("project", prog_ms),
            "programming_share": share(prog_ms, None, ms),
            "plan_refresh_ms": med("project", refresh_ms),
            "programming_with_refresh_share": share(prog_ms, refresh_ms, ms),
            "cold": {
                "formulation_ms": med("formulation", cold), "project_ms": med("project", cold),
                "floor_ms": med("floor", cold),
                "formulation_over_project": ratio("formulation", "project", cold),
                "project_over_floor": ratio("project", "floor", cold),
                "programming_ms": med("project", prog_cold),
                "programming_share": share(prog_cold, None, cold),
                "programming_with_refresh_share": share(prog_cold, refresh_cold, cold),
            },
            "targets": {"formulation_over_project": ">= 10 (stretch 15)", "project_over_floor": "<= 1.2",
                        "programming_share": "<= 0.10"},
            "check_state_max_diff_a_b": check["state_a_b"], "check_grad_rel_diff_a_b": check["grad_a_b"],
            "check_state_max_diff_project_b": check["state_project_b"],
            "check_grad_rel_diff_project_b": check["grad_project_b"],
        }
    ]  # fmt: skip
    if rram is not None:
        out.append({
            "bench": "peer_ep", "preset": "rram", "uri": a.rram_uri, **common, "rram_ms": med("rram"),
            "ideal_ms": med("project"), "rram_over_ideal": ratio("rram", "project"), "target": "<= 1.5",
            "rram_over_ideal_quartiles": spread("rram", "project"),
            "rram_programming_ms": med("rram", prog_ms),
            "ideal_programming_ms": med("project", prog_ms),
            "rram_plan_refresh_ms": med("rram", refresh_ms),
            "rram_over_ideal_without_programming": without_programming(ms, prog_ms),
            "cold": {
                "rram_ms": med("rram", cold), "ideal_ms": med("project", cold),
                "rram_over_ideal": ratio("rram", "project", cold),
                "rram_programming_ms": med("rram", prog_cold),
                "rram_over_ideal_without_programming": without_programming(cold, prog_cold),
            },
            "settle_steps_per_batch": {"ideal": statistics.median(steps["project"]),
                                       "rram": statistics.median(steps["rram"])},
        })  # fmt: skip
    for c in (ideal, rram):
        if c is not None:
            c.close()
    for o in out:
        print(json.dumps(o))


if __name__ == "__main__":
    main()
