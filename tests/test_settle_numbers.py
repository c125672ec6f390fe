"""Speed changes keep the numbers (issue 17): a few training steps of the classifier on the
ideal board, same seed, give the same losses, accuracies, weights and free states as before
the settle engine was moved out of `emulator.board` and made faster (the input-product
cache, lazy energies). The expected figures were computed with the code of commit 86650de
(before that work) by the function below; the weights are compared through their sum, sum
of squares and a fixed random projection, to float tolerance.

The four runs cover the two nudges (cross-entropy: an injected current, the two centered
phases settled as one over the doubled batch; mse: an elastic target, phase by phase) and
both ways of settling the centered phases."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peer_ep import IDEAL, project

EXPECTED = {
    "ce-True": {
        "loss": [2.4642701148986816, 2.3774523735046387, 2.376380443572998, 2.723041296005249],
        "acc": [0.125, 0.125, 0.0, 0.0],
        "w_sum": [-2.5896231533552054, -3.392644624284003],
        "w_sq": [8.086892602673018, 3.769610569216236],
        "w_proj": [4.273795438877253, -2.3767258370213087],
        "free_sum": {"s1": 21.77868409858575, "s2": 4.156125806641416},
    },
    "ce-False": {
        "loss": [2.4642701148986816, 2.3774523735046387, 2.376380681991577, 2.723041296005249],
        "acc": [0.125, 0.125, 0.0, 0.0],
        "w_sum": [-2.5896237442429992, -3.3926447220146656],
        "w_sq": [8.086892618553911, 3.7696105800089867],
        "w_proj": [4.273795532346855, -2.376725692255287],
        "free_sum": {"s1": 21.778682992340052, "s2": 4.156126262989478},
    },
    "mse-True": {
        "loss": [0.49708083271980286, 0.46912193298339844, 0.4913995862007141, 0.5389062166213989],
        "acc": [0.125, 0.125, 0.0, 0.0],
        "w_sum": [0.39433458516577957, -2.9105503740138374],
        "w_sq": [8.190316364326101, 3.7686938743123175],
        "w_proj": [4.066956696549581, -2.47348744849051],
        "free_sum": {"s1": 29.106598399131244, "s2": 4.194719309259401},
    },
    "mse-False": {
        "loss": [0.49708083271980286, 0.46912193298339844, 0.4913995862007141, 0.5389062166213989],
        "acc": [0.125, 0.125, 0.0, 0.0],
        "w_sum": [0.39433458516577957, -2.9105503740138374],
        "w_sq": [8.190316364326101, 3.7686938743123175],
        "w_proj": [4.066956696549581, -2.47348744849051],
        "free_sum": {"s1": 29.106598399131244, "s2": 4.194719309259401},
    },
}


def _batch(features: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, features, generator=g), torch.randint(0, 10, (n,), generator=g)


def fingerprint(loss: str, joint: bool) -> dict[str, object]:
    """Four steps of a 36-24-10 classifier (batch 8, T1 = 30, T2 = 10 + 10 centered)."""
    clf = project(IDEAL, [36, 24, 10], 8, 30, 10)
    clf.cfg.ep.loss = loss
    clf.block.joint_phases = joint
    proj = torch.Generator().manual_seed(123)
    out: dict[str, object] = {"loss": [], "acc": []}
    try:
        for k in range(4):
            x, y = _batch(36, 8, k)
            lo, acc, _ = clf.step(x, y)
            out["loss"].append(lo)  # type: ignore[attr-defined]
            out["acc"].append(acc)  # type: ignore[attr-defined]
        ws = [p.detach().double() for p in clf.block.weights.values()]
        out["w_sum"] = [float(w.sum()) for w in ws]
        out["w_sq"] = [float((w * w).sum()) for w in ws]
        out["w_proj"] = [
            float((w * torch.randn(w.shape, generator=proj, dtype=torch.float64)).sum()) for w in ws
        ]
        f = clf.last_settles["free"]
        # states: tensors from the in-process board's tensor path (hil.compute), numpy otherwise
        free = {g: torch.as_tensor(v) for g, v in f.states.items() if g != "s0"}
        out["free_sum"] = {g: float(v.double().sum()) for g, v in free.items()}
    finally:
        clf.close()
    return out


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_training_steps_keep_their_numbers(case: str) -> None:
    loss, joint = case.split("-")
    got = fingerprint(loss, joint == "True")
    want = EXPECTED[case]
    assert got["acc"] == want["acc"]
    for key in ("loss", "w_sum", "w_sq", "w_proj"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key
    assert got["free_sum"] == pytest.approx(want["free_sum"], rel=1e-5, abs=1e-4)
