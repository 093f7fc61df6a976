#!/usr/bin/env bash
# The runtime's GPU checks in one run, for a machine with a CUDA device (CI has none):
#   1. the numba.cuda kernels' throughput against the card's bandwidth (kernels_bench.py),
#   2. the GPU tests: kernels at full size against torch, the zoo on CUDA (gradients as
#      eager's, max_memory_allocated as planned), autocast bf16; the sm_90 PTX check,
#   3. the runtime benchmark on CUDA (planned vs max_memory_allocated, step-time ratios).
# Writes kernels.md, tests.log and runtime.md under $OUT (default ./gpu-results).
# Uses the machine's python3 with torch; wheels in .whl/ (lark, highspy) are installed
# to /tmp/site first when present. Each stage has its own time limit.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh [runtime-bench solver seconds, default 8]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
SOLVER_SECONDS=${1:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
for name in ("numba", "numba-cuda", "numpy", "scipy", "networkx", "lark", "highspy", "pytest", "hypothesis"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
EOF
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, keep the log, say how it ended
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/stages.txt"
    tail -n 40 "$OUT/$name.log"
}
stage kernels 90 python3 benchmarks/kernels_bench.py --out "$OUT/kernels.md"
stage tests 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_runtime_cuda.py \
    tests/test_runtime_kernels.py::test_kernels_compile_for_sm_90
stage runtime 200 python3 benchmarks/runtime_bench.py --device cuda --rounds 7 --solver-seconds "$SOLVER_SECONDS" --batch "${BATCH:-32}"
cp "$OUT/runtime.log" "$OUT/runtime.md" 2>/dev/null
