"""The noise-free analog settle loop as one TorchScript function, for the CPU.

A noise-free settle step is a handful of in-place torch calls on (nodes, batch) buffers: the
step's products (`Product`), the activation, the relaxation. On the small networks of the
README's main job (buffers of 72 to 132 nodes by 32 samples, about a million steps) each
call from Python costs about as much as its arithmetic (a clamp of 4000 values: 1.1 us, most
of it dispatch). `SettleEngine._settle_analog` hands such a settle to `run`: the whole loop,
its convergence checks included, in one call, compiled by TorchScript from `_settle_loop`
below. It calls the same aten kernels in the same order on the same buffers, so its states,
step counts and residuals equal the Python loop's bit for bit (tests/test_settle_script.py
checks them for every activation, with and without checks).

TorchScript is deprecated in favour of `torch.compile`, which on the CPU needs a C++
compiler when a program runs and compiles again per shape (seconds each: more than the main
job saves). Where TorchScript cannot compile the loop (a torch without it), `loop()` returns
None and the engine runs its Python loop; `SettleEngine.scripted = False` chooses that
loop too. Noisy settles (the pool's windows are drawn on the host), elastic nudges, traces
and CUDA (captured graphs: `SettleEngine._graph_steps`) keep the Python loop.

Noisy settles were run in this loop once (2026-12-05; Intel Xeon, 2 vCPUs, one torch thread,
a sweep on the other core, load average 1.1 to 1.5), bit for bit the Python loop's: the
pool's window offsets computed ahead from its generator's 32-bit words, the generator then
advanced by the words the steps used. Per step it was faster on long settles (24.6 against
29.2 us at 200 fixed steps of the main job's network on `rram`), but it cost about 100 us per
settle (the offsets ahead and the call), which made settles that stop at their noise floor
within 10 to 20 steps slower (88.6 against 77.2 us a step), and a 784-512-10 `rram` training
step gained 1 % (23.8 against 24.1 ms): its time is in the tiles' noise, not in Python. So it
was not kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

import torch
from torch import Tensor

from drivers import topology
from drivers.activation import rho_inplace

# how a product writes into its destination rows
ADDMM_INTO = 0  # out = a + m @ x (the first product of a destination: it starts from the drive)
ADDMM_ADD = 1  # out += m @ x
COPY = 2  # out = a (a destination with no free source: the drive alone)


@dataclass(frozen=True)
class Product:
    """One call of a settle step's products, on views of the workspace's buffers."""

    kind: int  # ADDMM_INTO, ADDMM_ADD or COPY
    out: Tensor
    a: Tensor  # the drive rows (ADDMM_INTO, COPY); unused by ADDMM_ADD
    m: Tensor  # (n_dst, n_src) matrix; unused by COPY
    x: Tensor  # source state rows (n_src, batch); unused by COPY

    @classmethod
    def into(cls, out: Tensor, drive: Tensor, m: Tensor, x: Tensor) -> Product:
        return cls(ADDMM_INTO, out, drive, m, x)

    @classmethod
    def add(cls, out: Tensor, m: Tensor, x: Tensor) -> Product:
        return cls(ADDMM_ADD, out, m, m, x)

    @classmethod
    def copy(cls, out: Tensor, drive: Tensor) -> Product:
        return cls(COPY, out, drive, drive, drive)

    def bind(self) -> Callable[[], object]:
        """The call as the Python loop runs it."""
        if self.kind == ADDMM_INTO:
            return partial(torch.addmm, self.a, self.m, self.x, out=self.out)
        if self.kind == ADDMM_ADD:
            return partial(self.out.addmm_, self.m, self.x)
        return partial(self.out.copy_, self.a)


def _settle_loop(
    every: int,
    last: int,
    tol: float,
    kinds: list[int],
    outs: list[Tensor],
    a: list[Tensor],
    m: list[Tensor],
    x: list[Tensor],
    act: str,
    gain: float,
    width: float,
    new: Tensor,
    state: Tensor,
    dt: float,
    safe_dt: float,
    patience: int,
) -> tuple[int, float, int]:
    """`SettleEngine._settle_analog`'s noise-free loop without a trace: the steps (products,
    activation, relaxation) up to each checked mark (every `every` steps, and the `last`), at
    a mark the largest change before the relaxation; stop once it is within `tol`. The steps
    relax by `dt` until `patience` checks in a row made no new smallest residual, and by
    `safe_dt` from there on (`SettlePlanner.step_sizes`); where `safe_dt` is 0 (not computed
    yet) the loop returns at that check instead. Returns (steps, the last checked residual,
    the step from which `safe_dt` ran or at which the loop returned for it, or -1). The marks
    are counted here, not passed in: a call given a settle's 320 marks (1600 steps checked
    every 5) took 20.4 us against 3.7 us given 32 (2026-12-05, Intel Xeon, one thread, load
    0.6)."""
    residual = float("inf")
    best = float("inf")
    stalled = 0
    fell_back = -1
    step = 0
    while step < last:
        mark = min(step + every - step % every, last)
        for j in range(mark - step):
            for i in range(len(kinds)):
                k = kinds[i]
                if k == 0:
                    torch.addmm(a[i], m[i], x[i], out=outs[i])
                elif k == 1:
                    outs[i].addmm_(m[i], x[i])
                else:
                    outs[i].copy_(a[i])
            rho_inplace(new, act, gain, width)
            checked = j == mark - step - 1
            if checked:
                residual = float((new - state).abs_().max())
            state.lerp_(new, dt)
            if checked:
                if residual <= tol:
                    return mark, residual, fell_back
                if residual < best:
                    best, stalled = residual, 0
                else:
                    stalled += 1
                    if stalled == patience and fell_back < 0 and dt != safe_dt:
                        if safe_dt <= 0.0:  # not known yet: the caller computes it and goes on
                            return mark, residual, mark
                        dt, fell_back = safe_dt, mark
        step = mark
    return step, residual, fell_back


@cache
def loop() -> Callable[..., tuple[int, float]] | None:
    """`_settle_loop` compiled by TorchScript (once per process), or None where it cannot be."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's notice
            return torch.jit.script(_settle_loop)
    except Exception:  # any failure to compile means: use the Python loop
        return None


def run(
    products: list[Product],
    every: int,
    last: int,
    tol: float,
    act: tuple[str, float, float],
    new: Tensor,
    state: Tensor,
    dt: tuple[float, float],
    inference: bool = True,
) -> tuple[int, float, int] | None:
    """Run a noise-free settle's steps (`act`: the activation's kind, gain and corner width;
    `dt`: the step sizes before and after the residual stalls, the second 0 where it is not
    known yet); (steps, residual, the step from which the second size ran or at which the loop
    returned for it, or -1), or None where the loop is not compiled (the caller runs its own).

    With `inference` the loop runs in `torch.inference_mode`: its calls then skip autograd's
    dispatch keys: 0.2 to 0.6 us of a 10 to 16 us step on the main job's settles
    (benchmarks/settle_script.py, 2026-12-05, Intel Xeon, one torch thread, load 0.7). The
    same kernels run, so the numbers are the same. The loop only writes into the
    workspace's buffers, which were made outside inference mode, and returns plain numbers,
    so no inference tensor escapes to a caller that might use it under autograd."""
    compiled = loop()
    if compiled is None:
        return None
    kinds = [p.kind for p in products]
    outs = [p.out for p in products]
    a = [p.a for p in products]
    m = [p.m for p in products]
    x = [p.x for p in products]
    kind, gain, width = act
    with torch.inference_mode(inference):
        return compiled(
            every, last, tol, kinds, outs, a, m, x, kind, gain, width, new, state, *dt, topology.STALL_CHECKS
        )
