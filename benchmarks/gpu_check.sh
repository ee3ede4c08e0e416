#!/usr/bin/env bash
# One accelerator check of fdm-vq: runs benchmarks/gpu_check.py from the repository root, passing every
# argument through, and prints its table (sized to finish in under 8 minutes on one H200). Without a CUDA
# device it prints one line and exits 0, unless asked for the CPU smoke test (--device cpu --quick).
# See docs/performance.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
