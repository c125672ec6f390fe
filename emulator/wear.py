"""Wear-out of a device against its declared pulse endurance (``DeviceModel.pulse_endurance``).

Only a board that declares an endurance models wear; without one nothing here runs and a
device behaves as new for ever. The model (docs/emulator.md, "Wear"):

- a device's conductance window stays as fabricated until its pulse count passes the onset,
  ``wear_onset`` times the endurance E (0.1 by default: the last decade of its life on a log
  axis of cycles);
- from there the window narrows linearly in log pulses and closes at E: of the fabricated
  window ``[g_lo, g_hi]`` a share ``1 - log(n / n_on) / log(E / n_on)`` is left after n pulses
  (``n_on = wear_onset E``). The bound the device fails at stays; the other moves toward it;
- a spent device (n >= E pulses: the board refuses any more) is stuck at the bound it
  failed at: ``g_hi`` (stuck at the low-resistance state: RRAM "RESET failure", PCM
  "stuck-SET") for a share ``wear_stuck_high`` of the devices, ``g_lo`` (stuck at the
  high-resistance state: RRAM "SET failure", PCM "stuck-RESET") for the others.

Sources: the two endurance failure modes of filamentary metal-oxide RRAM and the gradual
closure of the window that precedes them, the high-resistance state falling toward the low one
(stuck at LRS) or the low-resistance state rising toward the high one (stuck at HRS): B. Chen
et al., IEDM 2011, "Physical mechanisms of endurance degradation in TMO-RRAM"; Y. Y. Chen et
al., IEEE Trans. Electron Devices 59, 3243 (2012) (the SET/RESET balance picks the mode). PCM:
the RESET resistance falls with cycling until the cell is stuck-SET, or a void opens it
stuck-RESET: Kim et al., IRPS 2005, "Reliability investigations for manufacturable high density
PRAM"; Burr et al., J. Vac. Sci. Technol. B 28, 223 (2010). The onset share and the log-linear
shape are this emulator's choices (those papers show the window closing over the last
decade or two of cycles on a log axis), not a fit to a chip.

The narrowing is applied once per request, from the wear after it: a request's pulses find
the device as worn by all of them. The failure side is the fabrication's draw of which bound a
factory-stuck device sits at (`DeviceParams.draw_chip`), so declaring an endurance draws no
random number and leaves every other draw of the chip and the board as it was.
"""

from __future__ import annotations

import math

import torch

from drivers.errors import ConfigurationError


def onset_pulses(endurance: int, onset: float) -> float:
    """The pulse count after which a device's window starts narrowing: ``onset x endurance``."""
    return onset * endurance


def window_left(wear: torch.Tensor, endurance: int, onset: float) -> torch.Tensor:
    """The share of its fabricated window each device keeps after `wear` pulses (an integer
    tensor), float32 in [0, 1]: 1 up to the onset, ``1 - log(n / n_on) / log(E / n_on)``
    beyond it, 0 at the endurance E and past it."""
    if endurance < 1:
        raise ConfigurationError(f"a pulse endurance is >= 1 pulse, got {endurance}: declare a positive one")
    if not 0.0 < onset <= 1.0:
        raise ConfigurationError(
            f"wear_onset is the share of the endurance after which a window narrows, in (0, 1], got "
            f"{onset}: give e.g. 0.1 (the last decade of the device's life)"
        )
    if onset == 1.0:  # no gradual narrowing: the window holds until the device is spent
        return (wear < endurance).to(torch.float32)
    n_on = onset_pulses(endurance, onset)
    # float32: a count's log to 1e-7 relative, far below any window's resolution
    closed = wear.to(torch.float32).clamp_min_(n_on).div_(n_on).log_().mul_(1.0 / math.log(endurance / n_on))
    left = closed.neg_().add_(1.0).clamp_(0.0, 1.0)
    return torch.where(wear >= endurance, 0.0, left)


def worn_bounds(
    g_lo: torch.Tensor, g_hi: torch.Tensor, fails_high: torch.Tensor, left: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds of devices fabricated with ``[g_lo, g_hi]`` that keep a share `left` of that
    window, the bound each fails at (``g_hi`` where `fails_high`) kept: new tensors. A device
    that keeps all of it (``left == 1``) keeps its bounds exactly."""
    span = (g_hi - g_lo) * left
    whole = left >= 1.0
    lo = torch.where(whole | ~fails_high, g_lo, g_hi - span)
    hi = torch.where(whole | fails_high, g_hi, g_lo + span)
    return lo, hi
