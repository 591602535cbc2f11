#!/usr/bin/env bash
# One-shot check on a CUDA machine: environment, every test that has a CUDA variant (the decoder against
# transformers in fp32 and bf16 on the Triton attention and block ops, `score` in bf16, the loss, attention and
# block-op kernels in fp32 and bf16), then bench/kernels.py: the loss ops at the Qwen2.5-0.5B and -7B shapes
# (with a kernel profile of the chunked ranking heads), the packed attention against torch's kernels and the
# block ops against plain torch.
# Writes bench/results/<card>-<date>-<commit>.txt and ...-kernels.json (or to $OUT/ when run through the
# device tool) and prints the report.
# Run it first on a new GPU machine:  bash bench/gpu_check.sh
set -uo pipefail  # no -e: the report is written whatever fails; the exit status is pytest's
cd "$(dirname "$0")/.."
# Without an installed package (a machine with no registry cannot build one), run from the checkout.
if ! python3 -c "import tsarank_engine, tsarank_kernels" 2>/dev/null; then
  links=$(mktemp -d) && ln -s "$PWD/kernels" "$links/tsarank_kernels"  # kernels/ installs as tsarank_kernels
  export PYTHONPATH="$PWD:$links${PYTHONPATH:+:$PYTHONPATH}"
fi
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' )
dest=${OUT:-bench/results}
mkdir -p "$dest"
commit=${TSARANK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
log="$dest/${card:-no-gpu}-$(date +%Y-%m-%d)-$commit.txt"
{
  echo "# tsarank-engine GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $commit"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__); print('cuda available:', torch.cuda.is_available())"
  # The SmolLM2 tests need its GGUF package and a registry; they run in CI on the CPU.
  echo "CUDA variants: $(python3 -m pytest tests -m 'not slow' -k cuda --collect-only -q -p no:cacheprovider 2>/dev/null | tail -1)"
  python3 -m pytest tests -m "not slow" -q -rs -p no:cacheprovider 2>&1
  status=$?
  echo "pytest exit: $status"
  timeout "${KERNELS_BENCH_TIMEOUT:-300}" python3 bench/kernels.py --device cuda --profile --json "${log%.txt}-kernels.json"
  echo "bench/kernels.py exit: $?"
  exit $status
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
