#!/usr/bin/env bash
# The one device call of issue 13 (docs/gpu.md): on a lent GPU machine, in the repository's root,
#
#   1. Accelerate's FSDP path of the ContinualTrainer on the GPU (tests/test_trainer_sharded.py, its cuda case:
#      torchrun, one process per GPU, NCCL) against the same run on the GPU without FSDP;
#   2. the GPU figures (benchmarks/bench_gpu.py) within what is left of BUDGET_S.
#
# Usage: OUT=<folder> BUDGET_S=480 bash benchmarks/gpu_session.sh
# A dry run on a CPU (the cuda case skipped, the bench's tiny shapes):
#   OUT=/tmp/gpu BENCH_ARGS="--quick --device cpu" bash benchmarks/gpu_session.sh
# The machine's image has torch, transformers, accelerate and peft but not datasets / evaluate: their wheels travel
# in .whl/ (made here with `python3 -m pip download --no-deps ...`, see docs/gpu.md) and are installed into
# /tmp/site. Everything goes to $OUT: versions.txt, fsdp.log, bench.log, gpu.json, gpu.md.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
BUDGET_S=${BUDGET_S:-480}
START=$(date +%s)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import sys, torch, transformers, accelerate, peft; print(sys.version.split()[0], torch.__version__,
transformers.__version__, accelerate.__version__, peft.__version__)"
    python3 -c "import datasets, evaluate, pyarrow; print(datasets.__version__, evaluate.__version__,
pyarrow.__version__)"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

timeout 150 python3 -m pytest --runslow -p no:cacheprovider -q -s -rA tests/test_trainer_sharded.py \
    -k "one_process_per_device and cuda" 2>&1 | tee "$OUT/fsdp.log"
fsdp=$?

LEFT=$((BUDGET_S - ($(date +%s) - START)))
python3 benchmarks/bench_gpu.py --out "$OUT" --budget_s "$LEFT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench=$?
echo "fsdp check exit $fsdp, bench exit $bench, $(($(date +%s) - START)) s"
exit $((fsdp || bench))
