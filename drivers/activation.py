"""The neuron: a node circuit's transfer curve and the energy term that goes with it.

Every settle (the emulator's analog and mvm modes, its conv settle, the host-iterated settle
over `mvm`, the reference DHN) computes the next state of a free node as ``s = rho(u)`` of
its drive ``u = dPhi/ds``, and its energy as

    E(s) = sum_free G(s) - Phi(s) (+ the nudge's cost),   G(s) = integral of rho^{-1}(s) ds

(the Hopfield 1984 / Cohen-Grossberg form): dE/ds = rho^{-1}(s) - u vanishes exactly at the
fixed point s = rho(u), so EP (which only reads dPhi/dtheta at the fixed points) and the
reference's implicit differentiation (which uses rho'(u) there) stay exact for every curve
here. For the hard sigmoid G is today's ``s^2 / (2 gain)``.

All curves are written in the normalised drive ``a = gain * u``, and each has the hard
sigmoid's midpoint (rho = 1/2 at a = 1/2) and at most its slope (``gain``), so the step and
noise-floor bounds the settles derive from ``gain`` hold for all of them. Kinks bias EP: at a
corner rho' jumps, and a finite beta straddles it (issue 20); the smooth curves have none.

This module and `drivers.activation_curves` are the one place where the curves live, shared
by the emulator, the host stack and the drivers. This one names them (`Activation`) and
imports no torch, so that a `Topology` (which holds an `Activation`) and the Device layer load
without it (`hil info` of a board); the curves themselves are torch functions in
`drivers.activation_curves`, imported at the first curve computed, and their names
(`rho_inplace`...) are read from here as before.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from drivers.errors import ConfigurationError
from drivers.scalars import as_float

if TYPE_CHECKING:
    from torch import Tensor

ActivationKind = Literal["hard_sigmoid", "soft_sigmoid", "logistic"]
ACTIVATIONS: tuple[str, ...] = ("hard_sigmoid", "soft_sigmoid", "logistic")

# declared bounds of the soft sigmoid's corner width (in units of the linear range, a = 0..1):
# below 0.01 the corner is narrower than one step of a 7-bit DAC (1/128) and the curve is the
# hard sigmoid for every practical purpose (and its rho' as kinked); above 0.25 the node no
# longer reaches its rails (rho = 0.17 at a = 0) and its slope is 0.76 gain at most
MIN_WIDTH = 0.01
MAX_WIDTH = 0.25
DEFAULT_WIDTH = 0.1

_PI2_12 = math.pi**2 / 12.0
# where G is evaluated, states are kept this far inside (0, 1) (its limits there are finite; a
# float64 state closer to 1 than 1e-16 is 1)
_EDGE = 1e-300
_TOP = 1.0 - 2.0**-53


@dataclass(frozen=True)
class Activation:
    """A node circuit's transfer curve, by name (`ACTIVATIONS`) and, for the soft sigmoid,
    its corner width.

    - ``hard_sigmoid``: ``clamp(a, 0, 1)``. A transimpedance amplifier (op-amp with a
      feedback resistor, gain = R_f / R_ref) whose output saturates at its supply rails,
      idealised as two sharp corners. The default.
    - ``soft_sigmoid``: ``w softplus(a / w) - w softplus((a - 1) / w)``, the hard sigmoid with
      each corner rounded over a width ``w`` (`width`, in units of the linear range). The same
      amplifier with a diode or transistor clamp at each rail: an exponential I-V turns on
      over a few thermal voltages, so the rails are reached smoothly.
    - ``logistic``: ``sigmoid(4 a - 2)``. A differential pair (BJT, or MOS in subthreshold):
      its output current is ``I_tail / 2 (1 + tanh(v / 2 U_T))``, a logistic in the input
      voltage; the tanh-type saturating amplifier mapped to [0, 1] is this very curve
      (``(1 + tanh(x)) / 2 = sigmoid(2 x)``), so it is not a separate model. Scaled to the hard
      sigmoid's midpoint and slope.
    """

    kind: str = "hard_sigmoid"
    width: float = 0.0  # soft_sigmoid only; 0 there means DEFAULT_WIDTH

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATIONS:
            raise ConfigurationError(
                f"unknown activation {self.kind!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if self.kind == "soft_sigmoid":
            w = DEFAULT_WIDTH if self.width == 0.0 else self.width
            w = as_float("soft_sigmoid corner width", w, -math.inf, math.inf)
            if not MIN_WIDTH <= w <= MAX_WIDTH:
                raise ConfigurationError(
                    f"soft_sigmoid corner width must be in [{MIN_WIDTH}, {MAX_WIDTH}] (units of the "
                    f"linear range), got {w!r}; use hard_sigmoid for a sharper corner, logistic "
                    "for a wider one"
                )
            object.__setattr__(self, "width", w)
        elif self.width not in (0, 0.0):
            raise ConfigurationError(
                f"a corner width ({self.width!r}) is a soft_sigmoid parameter; {self.kind} has "
                "none: drop it, or choose soft_sigmoid"
            )

    # ------------------------------------------------------------------------------- names
    @classmethod
    def parse(cls, spec: Activation | str) -> Activation:
        """An `Activation` from itself or a name, ``"soft_sigmoid"`` or ``"soft_sigmoid:0.05"``."""
        if isinstance(spec, Activation):
            return spec
        if not isinstance(spec, str):
            raise ConfigurationError(f"activation must be a name, got {type(spec).__name__} {spec!r:.40}")
        kind, _, width = spec.partition(":")
        if not width:
            return cls(kind)
        try:
            w = float(width)
        except ValueError:
            raise ConfigurationError(
                f"activation {spec!r}: the corner width after ':' must be a number, e.g. soft_sigmoid:0.05"
            ) from None
        return cls(kind, w)

    @property
    def spec(self) -> str:
        """The name `parse` reads back: ``"logistic"``, ``"soft_sigmoid:0.1"``."""
        return f"{self.kind}:{self.width:g}" if self.kind == "soft_sigmoid" else self.kind

    @property
    def hard(self) -> bool:
        return self.kind == "hard_sigmoid"

    # ------------------------------------------------------------------------------ curves
    # computed by `drivers.activation_curves` (torch), imported at the first curve computed (an
    # import statement of a loaded module: a dictionary lookup per call)
    def rho(self, u: Tensor, gain: float) -> Tensor:
        """The node's output for the drive `u`."""
        from drivers import activation_curves

        return activation_curves.rho(self, u, gain)

    def rho_(self, x: Tensor, gain: float) -> Tensor:
        """`rho` in place on the drive `x` (the settle loops' buffers); returns `x`."""
        from drivers import activation_curves

        return activation_curves.rho_(self, x, gain)

    def rho_prime(self, u: Tensor, gain: float) -> Tensor:
        """d rho / du: for the hard sigmoid ``gain`` off the rails and 0 on them (its value at
        the corners themselves is the one-sided 0)."""
        from drivers import activation_curves

        return activation_curves.rho_prime(self, u, gain)

    def inverse(self, s: Tensor, gain: float) -> Tensor:
        """The drive u with ``rho(u) = s`` (for the hard sigmoid: ``s / gain``, the leak's
        current); ±inf at the rails of the smooth curves."""
        from drivers import activation_curves

        return activation_curves.inverse(self, s, gain)

    def leak(self, s: Tensor, gain: float) -> Tensor:
        """The energy's node term ``G(s)``, elementwise: ``G' = rho^{-1}``, so that the energy
        ``sum_free G(s) - Phi(s)`` is stationary exactly at ``s = rho(dPhi/ds)``. Finite on
        [0, 1] (states at the rails included); G(rho(0)) = 0."""
        from drivers import activation_curves

        return activation_curves.leak(self, s, gain)


def __getattr__(name: str) -> Any:
    """The curve functions (`rho_inplace`, which `emulator.settle_script` compiles, and the
    others) from `drivers.activation_curves`, as when they were defined here."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module("drivers.activation_curves"), name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


HARD_SIGMOID = Activation()
