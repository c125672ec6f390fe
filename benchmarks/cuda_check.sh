#!/usr/bin/env bash
# The CUDA checks of issue 17, as run on a lent NVIDIA H200 (docs/programming.md, "On a GPU"):
# the tests that need a GPU (they skip elsewhere), benchmarks/peer_ep.py on cuda at 512 and
# 4096 wide, then benchmarks/cuda_syncs.py (how often a step makes the host wait). Run from the
# repository root on a machine with a CUDA build of torch and the project's dependencies
# (`pip install -e '.[test]'` without constraints.txt). Each benchmark ends with its JSON lines;
# OUT (default: the current directory) gets the logs; PYTHON (default python3) is the interpreter.
set -uo pipefail
out="${OUT:-.}"
py="${PYTHON:-python3}"
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1
"$py" -m pytest -q -p no:cacheprovider -rs -W error::RuntimeWarning \
    tests/test_compute_device.py tests/test_program_stacked.py tests/test_drivers.py 2>&1 | tee "$out/cuda_tests.log" | tail -3
"$py" benchmarks/peer_ep.py --device cuda --repeats 9 2>&1 | tee "$out/peer_ep_512.log" | tail -2
"$py" benchmarks/peer_ep.py --device cuda --hidden 4096 --repeats 7 --skip-rram \
    --ideal-uri "emulator://?preset=ideal&seed=0&tile_cols_max=4096&tile_rows_max=4097&channels=8192" \
    2>&1 | tee "$out/peer_ep_4096.log" | tail -1
"$py" benchmarks/cuda_syncs.py 2>&1 | tee "$out/cuda_syncs.log" | tail -1
