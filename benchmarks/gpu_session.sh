#!/usr/bin/env bash
# The GPU measurements of issue 5, in stages that each fit one 10-minute call on the device machine
# (one H100, PyTorch 2.11 CUDA, numpy/scipy/pyyaml/pytest present, no internet). From this repo's root:
#
#   bash benchmarks/gpu_session.sh sync            # CUDA host-sync tests                     (~1 min)
#   bash benchmarks/gpu_session.sh steps           # step_cost.py fp32 / bf16 / bf16+channels_last (+ lean BN) (~4 min)
#   bash benchmarks/gpu_session.sh table1 KEYS     # reproduce_table1.py --runs KEYS (bf16, channels_last)
#   bash benchmarks/gpu_session.sh fp32 KEYS       # the same runs in float32 (the "without" column)
#
# KEYS: a comma list of reproduce_table1.py run keys (fast_at_8, fast_bat_8, fast_at_16, fast_bat_16,
# fast_bat_16_lam_exact, fast_bat_16_lam_inf). Results go to $RESULTS (default $OUT, the folder the
# device tool sends back, else benchmarks/results/gpu). Needs, carried in folders .git/info/exclude ignores:
#   .data/cifar10-jpg.tar.gz   (cp ../shared/data/cifar10-jpg.tar.gz .data/)      for table1 / fp32
#   .whl/pyautoattack-*.whl    (pip download --no-deps pyautoattack==0.2.0 -d .whl) for AutoAttack
# Settings the stages share: PGD-50-10 on the first $TEST_N test images (default 10000), AutoAttack on the
# first $AA_N (default 1000).
set -euo pipefail

stage=${1:?usage: gpu_session.sh sync|steps|table1|fp32 [RUN_KEYS]}
RESULTS=${RESULTS:-${OUT:-benchmarks/results/gpu}}
DATA=${DATA:-.data/cifar10-jpg.tar.gz}
TEST_N=${TEST_N:-10000}
AA_N=${AA_N:-1000}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"

table1() {  # $1: run keys, $2: file tag, rest: overrides for every run
    local keys=${1:?run keys}; local tag=$2; shift 2
    [ -f "$DATA" ] || { echo "gpu_session.sh: CIFAR-10 archive not found at $DATA (set DATA=...)"; exit 2; }
    python3 benchmarks/reproduce_table1.py --data "$DATA" --device cuda --runs "$keys" --test-n "$TEST_N" \
        --aa-n "$AA_N" --results "$RESULTS/table1_cuda_${tag}_${keys//,/-}.json" "$@" 2>&1 | tee "$RESULTS/table1_${tag}.log"
}

case "$stage" in
    sync)
        python3 -m pytest -q -rs tests/bilevel/test_core_cuda_sync.py tests/adversarial/test_methods_cuda_sync.py \
            2>&1 | tee "$RESULTS/cuda_sync_tests.log" ;;
    steps)
        python3 benchmarks/step_cost.py --device cuda --out "$RESULTS/step_cost_cuda.json"
        python3 benchmarks/step_cost.py --device cuda --amp bf16 --out "$RESULTS/step_cost_cuda_bf16.json"
        python3 benchmarks/step_cost.py --device cuda --amp bf16 --channels-last \
            --out "$RESULTS/step_cost_cuda_bf16_channels_last.json"
        # the lean BatchNorm double backward (models' use_lean_batchnorm): does it pay on the GPU?
        python3 benchmarks/step_cost.py --device cuda --amp bf16 --channels-last --lean-bn --no-memory \
            --methods "fast_at,fast_bat exact IG (lam=1/step),fast_bat no IG (lam=inf),fast_bat official pass sequence" \
            --out "$RESULTS/step_cost_cuda_bf16_channels_last_lean_bn.json" ;;
    table1)
        table1 "${2:?run keys}" bf16_cl train.amp=bf16 train.channels_last=true ;;
    fp32)
        table1 "${2:?run keys}" fp32 train.amp=none train.channels_last=false ;;
    *)
        echo "gpu_session.sh: unknown stage $stage (sync | steps | table1 | fp32)"; exit 2 ;;
esac
