#!/usr/bin/env bash
# One accelerator check of fdm-vq: runs benchmarks/gpu_check.py from the repository root, passing every
# argument through, and prints its table (sized to finish in under 8 minutes on one H200). Without a CUDA
# device it prints one line and exits 0, unless asked for the CPU smoke test (--device cpu --quick).
# See docs/performance.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python}"

wants_cpu=false
previous=""
for arg in "$@"; do
    if [[ "$arg" == "--device=cpu" || ( "$previous" == "--device" && "$arg" == "cpu" ) ]]; then
        wants_cpu=true
    fi
    previous="$arg"
done

if [[ "$wants_cpu" == false ]]; then
    cuda="$("$python" -c "import torch; print(torch.cuda.is_available())")"  # fails (set -e) without torch
    if [[ "$cuda" != "True" ]]; then
        echo "gpu_check: no CUDA accelerator available (torch.cuda.is_available() is False): nothing measured."
        exit 0
    fi
fi
exec "$python" benchmarks/gpu_check.py "$@"
