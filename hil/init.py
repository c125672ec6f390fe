"""Weight initialisation of EB blocks: the initialisers, the bias centring, and `init_weights`,
which picks an initialiser by name and centres the biases (the one place the classifier, the
ff-EBM blocks and the Hopfield VAEs draw their initial weights through).

- ``gaussian`` (`gaussian_init`): ``N(0, scale^2 / fan_in)`` per tile;
- ``goe`` (`goe_init`): one symmetric Gaussian matrix over all nodes (a contraction for
  ``scale < 1 / (2 gain)``), tile by tile for networks with conv couplings;
- biases ``zero`` or ``mid`` (`centre_biases`: each unit's drive in the middle of the linear
  range), and `kink_fraction`, which counts the units on a corner of the hard sigmoid.

Every initialiser draws from the `generator` it is given, in a fixed order (tile by tile, in
the topology's order), so a seed gives the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from drivers import BIAS, ConfigurationError, Topology
from hil.reference import DHN

__all__ = [
    "INITS",
    "INIT_BIASES",
    "InitBias",
    "centre_biases",
    "gaussian_init",
    "goe_init",
    "init_weights",
    "kink_fraction",
]

InitBias = Literal["zero", "mid"]
INIT_BIASES: tuple[str, ...] = ("zero", "mid")
INITS: tuple[str, ...] = ("gaussian", "goe")


def centre_biases(
    topology: Topology, weights: Mapping[str, Tensor], means: Mapping[str, float] | None = None
) -> dict[str, Tensor]:
    """`weights` with every bias row set so that each unit's normalised drive ``a = gain u``
    is 1/2, the middle of the curve's linear range, when every other unit sits at its mean
    state (`means`, per group; 1/2 where not given). With zero biases the drives are centred on
    the hard sigmoid's lower corner (a = 0), so about half the units sit on it at the start,
    where a finite-beta EP estimate straddles the kink (issue 20); centred, a unit reaches a
    corner only when its weighted inputs move it by 1/2. Conv tiles get one bias per output
    channel: the mean over the map's positions. A group fed by several bias rows gets the
    whole correction on the first; a group that no bias row reaches keeps its drive (centring
    it through its weights would need a row sum of 1/mean: a rank-one loop of gain 1, which
    drives it onto the rails). Weights are copied, not changed in place; a bias beyond the
    tile's ``w_max`` is clipped when the block programs it (`EBBlock.sync`), which leaves that
    unit's drive off the middle (measured on 64-256-10 at gaussian scale 0.6: 5.5-5.9 % of the
    hidden units and 1-2 of the 10 outputs, seeds 0-2)."""
    out = {t: torch.as_tensor(w).detach().clone() for t, w in weights.items()}
    net = DHN(topology, {t: w.to(torch.float64) for t, w in out.items()}, dtype=torch.float64)
    with torch.no_grad():
        mean = {
            g: torch.full((1, topology.size(g)), float((means or {}).get(g, 0.5)), dtype=torch.float64)
            for g in topology.groups
        }
        drive = net.drive(mean, bias=False)
    mid = 0.5 / topology.gain
    done: set[str] = set()
    for c in topology.couplings:
        if BIAS not in c.rows:
            continue
        row = topology.row_slice(c.tile, BIAS)
        start = 0
        for g in c.cols:
            n = topology.size(g) if c.kind != "conv" else topology.shapes[g][0]
            if g not in done:
                d = drive[g].reshape(n, -1).mean(dim=1) if c.kind == "conv" else drive[g][0]
                out[c.tile][row, start : start + n] = (mid - d).to(out[c.tile].dtype)
                done.add(g)
            start += n
    return out


def gaussian_init(
    topology: Topology,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    bias: InitBias = "zero",
) -> dict[str, Tensor]:
    """Weights ``N(0, scale^2 / fan_in)`` per tile (fan_in: the tile's rows); biases 0
    (``bias="zero"``) or centred in the linear range (``"mid"``: `centre_biases`)."""
    if bias not in INIT_BIASES:
        raise ConfigurationError(f"init bias must be one of {INIT_BIASES}, got {bias!r}")
    out = {}
    for c in topology.couplings:
        rows, cols = topology.tile_shape(c.tile)
        w = torch.randn(rows, cols, generator=generator) * (scale / math.sqrt(rows))
        if BIAS in c.rows:
            w[topology.row_slice(c.tile, BIAS)] = 0.0
        if c.kind == "dense":
            n = cols
            w[:n] = 0.5 * (w[:n] + w[:n].T)
            w[:n].fill_diagonal_(0.0)
        out[c.tile] = w
    return centre_biases(topology, out) if bias == "mid" else out


def kink_fraction(
    net: DHN, states: Mapping[str, Tensor | np.ndarray], free: list[str], margin: float = 0.0
) -> float:
    """Fraction of the free units (over the batch) of the equilibrium `states` whose normalised
    drive ``a = gain u`` is not inside ``(margin, 1 - margin)``: with ``margin=0`` the units on
    a rail of the hard sigmoid (rho' = 0), whose EP estimate a nudge that moves them back
    across the corner biases; a margin counts those within it of a corner too."""
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    like = next(iter(net.weights.values()))
    st = {g: torch.as_tensor(v).to(dtype=like.dtype, device=like.device) for g, v in states.items()}
    with torch.no_grad():
        drive = net.drive(st, targets=set(free))
    a = torch.cat([drive[g].reshape(drive[g].shape[0], -1) for g in free], dim=1) * net.gain
    return float(((a <= margin) | (a >= 1.0 - margin)).double().mean())


def init_weights(
    topology: Topology,
    init: str,
    scale: float,
    generator: torch.Generator | None = None,
    bias: str = "zero",
) -> dict[str, Tensor]:
    """A block's initial weights, drawn from `generator`: ``gaussian`` (`gaussian_init`,
    ``N(0, scale^2 / rows)`` per tile) or ``goe`` (`goe_init`: one symmetric matrix over all
    nodes, a contraction for ``scale < 1/2``); biases zero or (``bias="mid"``) centred in the
    linear range (`centre_biases`)."""
    if bias not in INIT_BIASES:
        raise ConfigurationError(f"init bias must be one of {INIT_BIASES}, got {bias!r}")
    if init == "goe":
        w = goe_init(topology, scale, generator)
        return centre_biases(topology, w) if bias == "mid" else w
    if init != "gaussian":
        raise ConfigurationError(f"init must be one of {INITS}, got {init!r}")
    return gaussian_init(topology, scale, generator, bias)  # type: ignore[arg-type]


def goe_init(
    topology: Topology, scale: float = 0.5, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """GOE initialisation: draw one symmetric Gaussian matrix over all N nodes of the
    topology (off-diagonal entries ``N(0, scale^2 / N)``, zero diagonal: a Gaussian
    Orthogonal Ensemble whose spectrum fills ``[-2 scale, 2 scale]``) and give each tile its
    block of it; bias rows start at 0. Symmetric by construction, so dense tiles get
    W_ij = W_ji, and the coupling matrix of the whole network is the GOE restricted to the
    topology's edges, whose spectral radius stays below ``2 scale``: with
    ``scale < 1 / (2 gain)`` the settle is a contraction from the start.

    A topology with conv couplings has feature maps of thousands of nodes, whose N x N matrix
    is not drawn (`_goe_conv`)."""
    if any(c.kind == "conv" for c in topology.couplings):
        return _goe_conv(topology, scale, generator)
    groups = [g for g in topology.groups]
    offsets, n = {}, 0
    for g in groups:
        offsets[g] = n
        n += topology.groups[g]
    a = torch.randn(n, n, generator=generator) * (scale / math.sqrt(n))
    m = torch.triu(a, diagonal=1)
    m = m + m.T
    out = {}
    for c in topology.couplings:
        rows, cols = topology.tile_shape(c.tile)
        w = torch.zeros(rows, cols)
        r0 = 0
        for rg in c.rows:
            rn = topology.size(rg)
            if rg != BIAS:
                c0 = 0
                for cg in c.cols:
                    cn = topology.size(cg)
                    w[r0 : r0 + rn, c0 : c0 + cn] = m[
                        offsets[rg] : offsets[rg] + rn, offsets[cg] : offsets[cg] + cn
                    ]
                    c0 += cn
            r0 += rn
        out[c.tile] = w
    return out


def _goe_conv(topology: Topology, scale: float, generator: torch.Generator | None) -> dict[str, Tensor]:
    """GOE-scaled weights for a network with conv couplings, tile by tile: a bipartite tile is
    the off-diagonal block of a GOE over the two groups it joins (entries
    ``N(0, scale^2 / (m + n))``, norm about ``scale (sqrt m + sqrt n) / sqrt(m + n)``, at most
    ``sqrt 2 scale``); a conv tile's kernel entries are ``N(0, sigma^2)`` with
    ``sigma = sqrt 2 scale / (k (sqrt C_in + sqrt C_out))``, which gives the convolution an
    operator norm of about ``sqrt 2 scale`` (measured by power iteration: 0.94 to 1.03 times
    that for 1 to 64 channels, 7 x 7 to 28 x 28 maps); bias rows start at 0. Dense tiles are
    drawn as in `goe_init`, on their own groups."""
    out = {}
    for c in topology.couplings:
        rows, cols = topology.tile_shape(c.tile)
        bias = int(BIAS in c.rows)
        if c.kind == "conv":
            c_in, c_out = topology.shapes[c.rows[0]][0], topology.shapes[c.cols[0]][0]
            sigma = math.sqrt(2.0) * scale / (c.kernel * (math.sqrt(c_in) + math.sqrt(c_out)))
            w = torch.randn(rows, cols, generator=generator) * sigma
        elif c.kind == "dense":
            a = torch.randn(cols, cols, generator=generator) * (scale / math.sqrt(cols))
            core = torch.triu(a, diagonal=1)
            w = torch.zeros(rows, cols)
            w[:cols] = core + core.T
        else:
            w = torch.randn(rows, cols, generator=generator) * (scale / math.sqrt(rows - bias + cols))
        if bias:
            w[topology.row_slice(c.tile, BIAS)] = 0.0
        out[c.tile] = w
    return out
