"""Issue 17: the three EP steps that `benchmarks/peer_ep.py` times compute the same thing: from
the same weights, one step of the per-step autograd formulation of the published EP code (a),
of the plain-torch floor in the board's layout (b) and of the project's `Classifier.step` on
the ideal emulator give the same free states and weight gradients to float tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.peer_ep import (
    IDEAL,
    RRAM,
    check_same_work,
    compare,
    peers,
    project,
    project_step,
    time_programming,
)

T1, T2 = 30, 10


def _batch(features: int, batch: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, features, generator=g)
    return x, torch.randint(0, classes, (batch,), generator=g)


@pytest.mark.parametrize("sizes", [[36, 24, 10], [30, 20, 16, 10]])
def test_formulation_floor_and_project_agree_after_one_step(sizes: list[int]) -> None:
    torch.manual_seed(0)
    x, y = _batch(sizes[0], 8)
    clf = project(IDEAL, sizes, 8, T1, T2)
    try:
        d = check_same_work(clf, x, y)
    finally:
        clf.close()
    assert d["state_a_b"] < 1e-5 and d["state_project_b"] < 1e-5, d
    assert d["grad_a_b"] < 1e-4 and d["grad_project_b"] < 1e-4, d


def test_the_three_keep_agreeing_over_steps_and_weights_move() -> None:
    """Three steps each: the peers keep their own weights in step with the project's SGD."""
    sizes = [36, 24, 10]
    clf = project(IDEAL, sizes, 8, T1, T2)
    try:
        form, floor = peers(clf)
        w_start = [w.clone() for w in floor.w]
        for k in range(3):
            x, y = _batch(sizes[0], 8, seed=k)
            ra, rb, rc = form.step(x, y), floor.step(x, y), project_step(clf, x, y)
            for s, g in (compare(ra, rb), compare(rc, rb)):
                assert s < 1e-5 and g < 1e-4, (k, s, g)
        assert any(float((a - b).abs().max()) > 1e-4 for a, b in zip(floor.w, w_start, strict=True))
        host = [p.detach() for p in clf.block.weights.values()]
        for a, b in zip(floor.w, host, strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    finally:
        clf.close()


def test_project_steps_run_their_full_budget_on_both_presets() -> None:
    """Equal step counts: tol 0 and the one convergence check at the last step, so even the
    noisy board runs T1 free and T2 + T2 nudged steps (no early stop within its noise floor)."""
    sizes = [36, 24, 10]
    x, y = _batch(sizes[0], 8)
    for uri in (IDEAL, RRAM):
        clf = project(uri, sizes, 8, T1, T2)
        try:
            for _ in range(2):
                _loss, _acc, st = clf.step(x, y)
                assert st["free_steps"] == T1 and st["nudge_steps"] == T2, (uri, st)
        finally:
            clf.close()


@pytest.mark.parametrize("change", [{"t1": T1 - 1}, {"t2": T2 - 1}, {"dt": 0.45}])
def test_the_check_tells_different_work_apart(change: dict[str, float]) -> None:
    """The tolerances have teeth: one free or nudged step fewer, or another dt, in the floor
    is outside them (states within 1e-5, gradients within 1e-4 of their largest entry)."""
    sizes = [36, 24, 10]
    x, y = _batch(sizes[0], 8)
    clf = project(IDEAL, sizes, 8, T1, T2)
    try:
        form, floor = peers(clf)
        for k, v in change.items():
            setattr(floor, k, v)
        s, g = compare(form.step(x, y), floor.step(x, y))
        assert s > 1e-5 or g > 1e-4, (s, g)
    finally:
        clf.close()


def test_cuda_syncs_counts_each_wait_in_the_phase_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/cuda_syncs.py on the CPU: torch's sync debug mode warns only on CUDA, so a
    warning of the same text is raised where the driver writes a tile; each lands in the
    programming phase, once per tile written, and the step is untouched afterwards."""
    import warnings

    from benchmarks.cuda_syncs import count_syncs

    clf = project(IDEAL, [64, 32, 10], 16, T1, T2)
    dev, blk = clf.block.device, clf.block
    plain = dev.program_stacked

    def waits(*args: object, **kw: object) -> object:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=2)
        return plain(*args, **kw)

    monkeypatch.setattr(dev, "program_stacked", waits)
    before = (blk.sync, dev.settle_tensors, clf.opt.step)
    figures = count_syncs(clf, [_batch(64, 16, seed=k) for k in range(3)])
    assert figures["steps"] == 3 and figures["tiles_programmed_per_step"] == 2.0
    assert figures["by_phase"] == {"programming": 2.0} and figures["per_programmed_tile"] == 1.0
    assert figures["settles_per_step"] >= 2 and figures["per_settle"] == 0.0
    assert (blk.sync, dev.settle_tensors, clf.opt.step) == before  # the wrappers are gone


def test_programming_time_counts_the_plan_refresh_its_writes_cause() -> None:
    """The benchmark's programming figure once stopped at `EBBlock.sync`, but a write also costs
    the emulated board the refresh of its settle plan, paid by the next settle (the weights
    recomputed from the conductances, the line conductances): `time_programming` counts that
    refresh, and only after a write (settles with no write between them add nothing)."""
    sizes = [36, 24, 10]
    clf = project(IDEAL, sizes, 8, T1, T2)
    try:
        acc = {"sync": 0.0, "refresh": 0.0}
        time_programming(clf, acc)
        x, y = _batch(sizes[0], 8)
        clf.step(x, y)  # its free settle builds the plan; its writes come at the end of the step
        assert acc["sync"] > 0.0 and acc["refresh"] == 0.0, acc  # built, not refreshed
        clf.predict(x)  # the first settle after the writes refreshes the plan
        assert acc["refresh"] > 0.0, acc
        acc.update(sync=0.0, refresh=0.0)
        clf.predict(x)
        clf.predict(x)
        assert acc == {"sync": 0.0, "refresh": 0.0}  # nothing written since the last settle
        clf.step(x, y)  # refreshes nothing (no write since), then writes
        assert acc["sync"] > 0.0 and acc["refresh"] == 0.0, acc
        clf.step(x, y)  # refreshes the plan for the last step's writes, then writes
        assert acc["refresh"] > 0.0, acc
    finally:
        clf.close()


def test_the_benchmark_reports_warm_and_cold_steps_of_the_same_batches() -> None:
    """The whole benchmark at toy sizes, as a user runs it: one JSON line per preset, warm
    (headline) and cold figures for every implementation, and a bad --run refused."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "peer_ep.py"), "--hidden", "16", "--batch", "8",
           "--t1", "3", "--t2", "2", "--repeats", "2", "--run", "2"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    ideal, rram = lines
    assert ideal["run"] == 2 and ideal["repeats"] == 2
    for d in (ideal, ideal["cold"]):
        assert d["formulation_ms"] > 0 and d["project_ms"] > 0 and d["floor_ms"] > 0
        assert d["formulation_over_project"] > 0 and 0 <= d["programming_share"] < 1
    assert rram["cold"]["rram_ms"] > 0 and rram["rram_over_ideal"] > 0
    assert rram["settle_steps_per_batch"] == {"ideal": 5.0, "rram": 5.0}
    bad = subprocess.run([*cmd[:2], "--run", "0"], capture_output=True, text=True, timeout=120, cwd=root)
    assert bad.returncode == 2 and "--run 0: give a whole number from 1 to 100" in bad.stderr
