#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one command, for a machine whose Python already has CuPy, PyTorch with
# CUDA, Numba, hypothesis and pytest-benchmark (the device machines' image does; nothing is downloaded): installs
# qnalo without its dependencies, runs the GPU tests (-m gpu: each CUDA kernel against its NumPy reference, every
# variant end to end against the CPU engine), then benchmarks/bench_cuda.py, then benchmarks/profile_cuda.py (GPU
# time per op, qnalo's and PyTorch's). Logs and the reports go to $OUT (or ./gpu_out). Each part has a time limit
# (seconds: QNALO_GPU_TESTS_S, QNALO_GPU_BENCH_S, QNALO_GPU_PROFILE_S), so that a slow one cannot starve the
# others on a lent machine's short time. Run from the repository root:  bash benchmarks/run_on_gpu.sh
# Each part gets SIGINT at its limit (then SIGKILL 20 s later), so pytest still prints what passed and failed so far.
# Both pytest runs start inside a subfolder, so that `import qnalo` finds the installed copy (the checkout's
# qnalo/ lacks qnalo.kernels, which setup.cfg maps from kernels/).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/qnalo_site . || exit 1
export PYTHONPATH=/tmp/qnalo_site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import cupy, torch, numba; print('cupy', cupy.__version__, 'torch', torch.__version__, 'numba', numba.__version__)" \
    | tee -a "$out/gpu.txt"
(cd tests && timeout -s INT -k 20 "${QNALO_GPU_TESTS_S:-210}" python3 -m pytest -v -m gpu -p no:cacheprovider --rootdir=.. \
    -c ../setup.cfg test_kernels_cuda.py test_models_cuda.py -s --tb=short --durations=15 2>&1) | tee "$out/gpu_tests.log"
tests_rc=$?
(cd benchmarks && timeout -s INT -k 20 "${QNALO_GPU_BENCH_S:-140}" python3 -m pytest -q bench_cuda.py 2>&1) \
    | tee "$out/bench_cuda.log"
cp benchmarks/results/cuda_latest.md "$out/" 2>/dev/null
timeout -s INT -k 20 "${QNALO_GPU_PROFILE_S:-70}" python3 benchmarks/profile_cuda.py --out "$out" 2>&1 | tee "$out/profile_cuda.log"
exit $tests_rc
