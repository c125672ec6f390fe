"""The stop rule of a noisy settle, per sample (`SampleStop`), shared by the emulator's two
settle loops (`emulator.settle`: analog and mvm mode) and the host-iterated settle of an
MVM-only board (`hil.host_settle`).

A noisy settle cannot wait for its residual ``max |rho(u) - s|`` to reach a tight `tol`: the
noise alone keeps it near six standard deviations of the drive noise. The rule this module
replaces compared the largest residual over every node of the batch with ``tol`` plus that
floor, so where a settle stopped depended on how many samples shared it (a batch of one has
fewer draws to push its maximum over the floor), and it passed during a layered settle's
transient, where the far layers' residual is small because the near layers have not grown
yet (docs/emulator.md, "Convergence"). Here every sample is judged on its own states:

- the *movement* of its states, ``max_i |s_t - s_{t-k}|`` over its nodes, is measured
  against its states at the check half-way back through the settle (k grows with the settle:
  a slow drift adds up over the window, the noise's movement does not grow past that of two
  independent draws), and compared with ``tol`` plus `STOP_SIGMAS` standard deviations of
  the movement that the noise alone gives a node at equilibrium (`movement_sd`, from the
  sample's own noise per step);
- a sample stops at the `QUIET_CHECKS`-th check in a row within that bound (a settle from
  rest cannot stop at its first check unless its states stay where they started: that check
  compares with the start);
- a stopped sample keeps the states of the check where it stopped (the batch runs on until
  every sample has stopped or the budget is spent, but what a sample returns is its own
  stop's), so a sample's result does not depend on which other samples shared its settle,
  only on its own trajectory (whose noise draws, windows of a shared pool, do depend on the
  batch: the agreement is statistical).

A window from half-way back costs steps: a sample stops about twice as late as its transient
ends (measured in docs/emulator.md, "Convergence"); a fixed window of a few checks stops
sooner, and as far from the fixed point as the residual did wherever a slow mode decays
over more steps than the window.

A check reads one value back (how many samples still run, with the batch's largest
residual); the rest stays on the device."""

from __future__ import annotations

import math

import torch

# standard deviations of the stationary movement a sample's largest node may reach and still
# count as noise (the maximum is over that sample's nodes, a fixed count: no batch in it)
STOP_SIGMAS = 6.0
# checks in a row within the bound before a sample stops
QUIET_CHECKS = 2
# the movement's window: this share of the checks so far (0.5: from the check half-way back)
WINDOW = 0.5


def movement_sd(dt: float, k: int) -> float:
    """The standard deviation of ``s_t - s_{t-k}``, per unit of the noise that one step adds to
    a node's target, for a node relaxing as ``s <- s + dt (target + noise - s)`` by itself at
    its equilibrium: its states are an AR(1) process of stationary variance ``dt / (2 - dt)``
    and autocorrelation ``(1 - dt)^k`` over k steps."""
    if dt <= 0.0:
        return 0.0
    var = dt / (2.0 - dt)
    return math.sqrt(2.0 * var * (1.0 - (1.0 - dt) ** k))


class SampleStop:
    """Per-sample stopping of one settle on (nodes, batch) states (see the module docstring).

    `check` is called at every convergence check with the states after the step, the
    per-sample standard deviation of the noise added to a node's target that step (the
    largest over the groups, (batch,), times the gain: in state units) and the residual of the
    step (nodes, batch); it returns how many samples still run and the batch's largest
    residual. `steps`: what the converters' steps alone may move a node between two
    checks (a DAC step of the states, an ADC step of the drive times the gain), added to the
    bound as it is. The mean steps per sample (`outcome`) are what the batch costs a board that
    settles its samples one after another."""

    def __init__(self, state: torch.Tensor, tol: float) -> None:
        batch = state.shape[1]
        self.tol = tol
        # the states at the start and at every check since the one half-way back (the window
        # of the movement, see the module docstring)
        self.snaps: dict[int, tuple[int, torch.Tensor]] = {0: (0, state.clone())}
        self.checks = 0
        self.held = torch.zeros_like(state)  # a stopped sample's states at its stop
        self.done = torch.zeros(batch, dtype=torch.bool, device=state.device)
        self.quiet = torch.zeros(batch, dtype=torch.bool, device=state.device)
        self.steps = torch.zeros(batch, dtype=torch.int64, device=state.device)  # a sample's stop
        self.residual = torch.full((batch,), math.inf, device=state.device)  # ... and residual there

    def check(
        self,
        state: torch.Tensor,
        noise_sd: torch.Tensor,
        residual: torch.Tensor,
        step: int,
        dt: float,
        steps: float = 0.0,
    ) -> tuple[int, float]:
        self.checks += 1
        back = self._back(self.checks)
        then, prev = self.snaps[back]
        k = step - then
        move = (state - prev).abs_().amax(0)
        bound = noise_sd * (STOP_SIGMAS * movement_sd(dt, k))
        bound.add_(self.tol + steps)
        quiet = move <= bound
        stop = quiet & self.quiet & ~self.done if QUIET_CHECKS > 1 else quiet & ~self.done
        self.quiet = quiet
        self.held = torch.where(stop, state, self.held)
        self.steps = torch.where(stop, step, self.steps)
        res = residual.amax(0)
        running = ~(self.done | stop)
        # a running sample's residual is its latest one
        self.residual = torch.where(stop | running, res, self.residual)
        self.done |= stop
        self.snaps[self.checks] = (step, state.clone())
        for old in [c for c in self.snaps if c < self._back(self.checks + 1)]:
            del self.snaps[old]
        # one read back: how many samples run on, and the batch's largest residual (for the
        # step-size fallback, `SettlePlanner.step_sizes`)
        n, largest = torch.stack([running.sum().to(res.dtype), res.max()]).tolist()
        return int(n), largest

    def final(self, state: torch.Tensor, step: int) -> None:
        """Write the stopped samples' held states into `state`; the others ran to `step`."""
        state.copy_(torch.where(self.done, self.held, state))
        self.steps = torch.where(self.done, self.steps, step)

    @staticmethod
    def _back(checks: int) -> int:
        """The check whose states the movement at check `checks` is measured from."""
        return int(checks * (1.0 - WINDOW))

    def outcome(self) -> tuple[float, float, bool]:
        """(mean steps per sample, the largest residual of a sample at its stop, whether every
        sample stopped), after `final`."""
        mean, res, done = torch.stack(
            [self.steps.double().mean(), self.residual.double().max(), self.done.all().double()]
        ).tolist()
        return mean, res, bool(done)

    def view(self, state: torch.Tensor) -> torch.Tensor:
        """The states as the samples hold them now (a trace record)."""
        return torch.where(self.done, self.held, state)
