#!/usr/bin/env bash
# One-shot check on a CUDA machine, in under 8 minutes: environment, every test that has a CUDA variant (the
# decoder against transformers in fp32 and bf16 on the Triton attention and block ops, `score` in bf16, the loss,
# attention and block-op kernels in fp32 and bf16), then bench/kernel_ops.py: the loss ops at the Qwen2.5-0.5B and
# -7B shapes (with a kernel profile of the chunked ranking heads), the packed attention against torch's kernels
# and the block ops against plain torch; then bench/train_steps.py (a few steps of each stage, and of stage 2
# with LoRA, through `tsarank-engine train`: bf16, FSDP2 in one process, the default attention, the Triton
# ranking head), bench/rerank.py (scoring in fp32 and on the mixed bf16 / fp16 path), bench/serve.py
# --in-process (the server's cross-request batching against one request at a time) and bench/throughput.py (both
# training stages and reranking, engine against the paper's way) on random models of the Qwen2.5-0.5B shape (and
# -1.5B, if time is left).
# Each part gets a time limit from what is left of BUDGET_S (default 460 s); bench/throughput.py rewrites its
# JSON after every measurement, so a part cut short keeps what it measured.
# Writes bench/results/<card>-<date>-<commit>.txt, ...-kernels.json and ...-throughput-<shape>.json (or to
# $OUT/ when run through the device tool) and prints the report.
# Run it first on a new GPU machine:  bash bench/gpu_check.sh
set -uo pipefail  # no -e: the report is written whatever fails; the exit status is pytest's
cd "$(dirname "$0")/.."
# Without an installed package (a machine with no registry cannot build one), run from the checkout.
if ! python3 -c "import tsarank_engine, tsarank_kernels" 2>/dev/null; then
  export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"  # kernels/ holds the package tsarank_kernels
fi
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' )
dest=${OUT:-bench/results}
mkdir -p "$dest"
commit=${TSARANK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
log="$dest/${card:-no-gpu}-$(date +%Y-%m-%d)-$commit.txt"
deadline=$((SECONDS + ${BUDGET_S:-460}))
left() { local n=$((deadline - SECONDS)); ((n > $1)) && n=$1; ((n < 1)) && n=1; echo "$n"; }  # min(cap, time left), >= 1
{
  echo "# tsarank-engine GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $commit"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__); print('cuda available:', torch.cuda.is_available())"
  # The SmolLM2 tests need its GGUF package and a registry; they run in CI on the CPU.
  echo "CUDA variants: $(python3 -m pytest tests -m 'not slow' -k cuda --collect-only -q -p no:cacheprovider 2>/dev/null | tail -1)"
  timeout "$(left 160)" python3 -m pytest tests -m "not slow" -q -rs -p no:cacheprovider 2>&1
  status=$?
  echo "pytest exit: $status"
  timeout "$(left 90)" python3 bench/kernel_ops.py --device cuda --profile --json "${log%.txt}-kernels.json"
  echo "bench/kernel_ops.py exit: $?"
  timeout "$(left 120)" python3 bench/train_steps.py --device cuda --shape qwen2.5-0.5b --steps 4 \
    --json "${log%.txt}-train-steps.json"
  echo "bench/train_steps.py exit: $?"
  # scoring precision: the engine in fp32 and on its mixed bf16 / fp16 path, transformers in bf16 (speed, agreement)
  timeout "$(left 60)" python3 bench/rerank.py --device cuda --shape qwen2.5-0.5b --pairs 400 \
    --systems engine-fp32,engine-bf16,engine-fp16,hf-bf16 --json "${log%.txt}-rerank.json"
  echo "bench/rerank.py exit: $?"
  # cross-request batching of `serve` (the scheduler in-process: this machine has no serve extra)
  timeout "$(left 60)" python3 bench/serve.py --in-process --device cuda --shape qwen2.5-0.5b --clients 1 16 \
    --docs 20 --requests 3 --json "${log%.txt}-serve.json"
  echo "bench/serve.py exit: $?"
  for shape in qwen2.5-0.5b qwen2.5-1.5b; do
    timeout "$(left 150)" python3 bench/throughput.py --device cuda --shape "$shape" --systems engine,engine-prepacked,baseline \
      --steps 2 --warmup 1 --json "${log%.txt}-throughput-$shape.json"
    echo "bench/throughput.py --shape $shape exit: $?"
  done
  exit $status
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
