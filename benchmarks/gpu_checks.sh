#!/usr/bin/env bash
# The GPU checks, as one prepared script for a session whose task draws a device (docs/benchmarks.md,
# "GPU"). The device machine reaches no package registry and its image lacks DuckDB and Pydantic
# (tests/test_gpu.py needs both), so they travel as wheels for its Python 3.12:
#
#   bash benchmarks/gpu_checks.sh --fetch          # here, once: wheels into .whl/ (git-ignored, ~27 MiB)
#   device run: command "bash benchmarks/gpu_checks.sh", carry [".whl"], timeout_s 600
#
# On the device it prints the machine, then runs each check under its own time limit (the three
# together fit one 10-minute call), and leaves every log under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(duckdb==2.0.1 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
        typing-extensions==4.16.0)

if [ "${1:-}" = "--fetch" ]; then
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
fi

out="${OUT:-/tmp/gpu-checks}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_checks: the carried wheels did not install"; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD"
else
    echo "gpu_checks: no .whl/ carried: tests/test_gpu.py needs DuckDB and Pydantic (run --fetch here first)"
    export PYTHONPATH="$PWD"
fi

check() {  # NAME SECONDS COMMAND...: one check, its log in $out/NAME.txt, its exit status reported
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
    "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
    2>&1 | tee "$out/device.txt"
check bench 200 python3 -m workers.bench --scaling --device cuda
check test_gpu 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
check scale 200 python3 benchmarks/scale.py --device cuda --layers 1 --tokens 4096 --shapes 410m \
    --eig 2048,4096,8192,16384
