"""Resume state without pickle: a tree of dicts, lists, tuples, scalars, strings, numpy arrays
and torch tensors becomes one JSON tree plus named arrays.

JSON tree encoding (docs/runlog.md, "Snapshots"):

- ``None``, ``bool``, ``str``, finite ``float`` and ``int`` with ``|x| < 2**53``: themselves;
- other ints: ``{"__int__": "<decimal>"}``; NaN and infinities: ``{"__float__": "nan"|"inf"|"-inf"}``;
- lists: lists; tuples: ``{"__tuple__": [...]}``;
- dicts whose keys are all strings not starting with ``__``: objects; any other dict (a torch
  optimizer's ``state`` has int keys): ``{"__dict__": [[key, value], ...]}``;
- numpy scalars: ``{"__npscalar__": value, "dtype": "<numpy dtype>"}``;
- arrays and tensors: ``{"__array__": "<array name>", "kind": "ndarray"|"tensor", "dtype": ...}``,
  the data in the array of that name beside the tree. Tensors whose dtype numpy lacks (bfloat16,
  float8) are stored as raw integers of the same width and viewed back.

Anything else is refused with the path of the offending value: a resume state is data, and
the store must be readable without this project's code.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hil.runlog.layout import RunLogError

if TYPE_CHECKING:
    import torch

# torch is imported where a tensor is encoded or decoded, not by this module: a reader of a run
# log (`hil inspect`, `hil plot`) decodes no tensor and loads no torch (tests/test_cli_lazy_imports.py)
_SAFE_INT = 2**53
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def _raw_int(width: int) -> torch.dtype:
    """The torch integer dtype of `width` bytes, that a tensor numpy has no dtype for is stored as."""
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]


def encode_state(state: Mapping[str, Any]) -> tuple[Any, dict[str, np.ndarray]]:
    """Return (JSON tree, arrays by name) for `state`; raise RunLogError on unsupported values."""
    import torch

    arrays: dict[str, np.ndarray] = {}

    def name_for(path: list[str]) -> str:
        base = _NAME_CHARS.sub("_", ".".join(path)) or "array"
        if base.startswith("__"):
            base = "a" + base
        name, i = base, 1
        while name in arrays:
            i += 1
            name = f"{base}-{i}"
        return name

    def enc(x: Any, path: list[str]) -> Any:
        if x is None or isinstance(x, bool | str):
            return x
        if isinstance(x, int):
            return x if abs(x) < _SAFE_INT else {"__int__": str(x)}
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            return {"__float__": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu()
            try:
                data, raw = t.numpy(), False
            except TypeError:
                data, raw = t.view(_raw_int(t.element_size())).numpy(), True
            name = name_for(path)
            arrays[name] = data
            ref = {"__array__": name, "kind": "tensor", "dtype": str(t.dtype).removeprefix("torch.")}
            return ref | {"raw": True} if raw else ref
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biufc":
                raise RunLogError(f"state {'.'.join(path)}: arrays of dtype {x.dtype} are not supported")
            name = name_for(path)
            arrays[name] = x
            return {"__array__": name, "kind": "ndarray", "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return {"__npscalar__": enc(x.item(), path), "dtype": str(x.dtype)}
        if isinstance(x, list):
            return [enc(v, [*path, str(i)]) for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, [*path, str(i)]) for i, v in enumerate(x)]}
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, [*path, k]) for k, v in x.items()}
            return {"__dict__": [[enc(k, path), enc(v, [*path, str(k)])] for k, v in x.items()]}
        raise RunLogError(
            f"state {'.'.join(path) or '<root>'}: cannot store a {type(x).__name__} "
            "(use dicts, lists, tuples, numbers, strings, numpy arrays or torch tensors)"
        )

    return enc(state, []), arrays


def decode_state(tree: Any, load: Callable[[str], np.ndarray]) -> Any:
    """Inverse of `encode_state`; `load(name)` returns the array of that name."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__array__" in x:
            data = load(x["__array__"])
            if x["kind"] == "ndarray":
                return data.astype(np.dtype(x["dtype"]), copy=False)
            import torch

            t = torch.from_numpy(np.array(data, copy=True))
            dtype = getattr(torch, x["dtype"])
            return t.view(dtype) if x.get("raw") else t.to(dtype)
        if "__int__" in x:
            return int(x["__int__"])
        if "__float__" in x:
            return float(x["__float__"])
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {dec(k): dec(v) for k, v in x["__dict__"]}
        if "__npscalar__" in x:
            return np.dtype(x["dtype"]).type(dec(x["__npscalar__"]))
        return {k: dec(v) for k, v in x.items()}

    return dec(tree)


def rng_state() -> dict[str, Any]:
    """The global random states: torch (CPU, and CUDA when present), numpy's legacy global
    generator and Python's `random`. Generators a loop owns (``torch.Generator``,
    ``np.random.Generator``) go in the state by their own ``get_state()``/``bit_generator.state``."""
    import torch

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global random states captured by `rng_state`."""
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


class _StateDict(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


def training_state(
    *,
    model: _StateDict | None = None,
    optimizer: _StateDict | None = None,
    scheduler: _StateDict | None = None,
    global_rng: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """The state a snapshot needs to resume training: the state dicts of the model, optimizer
    and scheduler given, the global RNG states (``rng``), and `extra` (step, data order,
    generators...). `global_rng=False` leaves the global states out: for a loop whose every draw
    comes from generators of its own (kept in `extra`), such as the project's trainers, whose
    runs never seed the global generators, so their states would differ between two runs of one
    seed and restoring them would change nothing."""
    state: dict[str, Any] = {"extra": extra}
    if global_rng:
        state["rng"] = rng_state()
    for key, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None:
            state[key] = obj.state_dict()
    return state


def restore_training(
    state: Mapping[str, Any],
    *,
    model: _StateDict | None = None,
    optimizer: _StateDict | None = None,
    scheduler: _StateDict | None = None,
    global_rng: bool = True,
) -> dict[str, Any]:
    """Load a `training_state` back into the objects given, restore the global RNG states (last,
    so nothing in between draws from them) and return the ``extra`` values. `global_rng=False`
    leaves the global generators alone: for a loop whose every draw comes from generators of
    its own (kept in ``extra``), such as the project's trainers."""
    for key, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if key not in state:
            raise RunLogError(f"the snapshot has no {key} state to restore")
        obj.load_state_dict(state[key])
    if global_rng:
        if "rng" not in state:
            raise RunLogError(
                "the snapshot has no global RNG states to restore (it was taken with "
                "training_state(global_rng=False), by a loop that draws from generators of its own): "
                "restore it with restore_training(..., global_rng=False)"
            )
        restore_rng(state["rng"])
    return dict(state.get("extra", {}))
