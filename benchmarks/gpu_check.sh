#!/usr/bin/env bash
# One call on a lent, offline H100/H200: the GPU tests, then the training and TV throughput benchmarks;
# every result under $OUT, summed up in $OUT/summary.json (printed at the end).
#   run:  bash benchmarks/gpu_check.sh          (OUT defaults to ./gpu-check-out; PYTHON to python3)
# Needs only what such a machine has: torch, transformers, tokenizers, safetensors, numpy, pytest.
# No install step (the machine is offline): the engine and the GPU tests import without textual,
# typer, rich or datasets. Stages run in order of what is unknown and are skipped, not cut, when
# the budget (GPU_CHECK_BUDGET seconds, default 450) would not cover them. Files back: at most 8.
set -u
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS

stage() {   # stage NAME SECONDS_NEEDED TIMEOUT COMMAND...: run it if the budget allows, record how it went;
            # its stdout is appended to throughput.jsonl, its stderr to throughput.err
  local name=$1 need=$2 limit=$3 left t0 rc
  shift 3
  left=$(( BUDGET - (SECONDS - start) ))
  if (( left < need )); then
    echo "{\"stage\": \"$name\", \"skipped\": \"$left s left of the budget, $need s needed\"}" >> "$OUT/stages.jsonl"
    return
  fi
  (( limit > left )) && limit=$left
  t0=$SECONDS
  timeout "$limit" "$@" >> "$OUT/throughput.jsonl" 2>> "$OUT/throughput.err"
  rc=$?
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( SECONDS - t0 ))}" >> "$OUT/stages.jsonl"
  echo "[gpu_check] $name: rc $rc in $(( SECONDS - t0 )) s ($(( SECONDS - start )) s so far)"
  "$PY" benchmarks/gpu_summary.py "$OUT" > /dev/null 2>&1
}

EXTRA=${GPU_CHECK_EXTRA:-}   # e.g. "--small --device cpu": a dry run of this script on a laptop

{ nvidia-smi; "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0), 'transformers', transformers.__version__)"; } > "$OUT/device.txt" 2>&1
# 1. what has never run on a GPU: the GPU tests (CUDA graphs with stable grads, pre-warm, compile across
#    a noise drop, host-held CIFAR in pinned memory); 2. the presets' default path (compile = "auto",
#    data.hold as auto holds a full CIFAR-5m, GPT-2 with the presets' vocabulary 50257); 3. a profile of
#    that GPT-2; 4. what is known from 2026-11-28 (eager, padded vocabulary, GPU-held CIFAR, packing, TV),
#    and packing under MPS (never measured).
stage gpu_tests        120 170 sh -c "\"$PY\" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -o addopts='' -rA \
                               > \"$OUT/gpu_tests.txt\" 2>&1"
stage resnet_default    70 120 "$PY" benchmarks/throughput.py resnet --compile=auto $EXTRA
stage resnet_bs32_default 50 90 "$PY" benchmarks/throughput.py resnet --batch 32 --compile=auto --steps 300 --warmup 100 $EXTRA
stage gpt2_default     100 160 "$PY" benchmarks/throughput.py gpt2 --compile=auto --set model.vocab_size=50257 \
                               --steps 50 --warmup 15 $EXTRA
stage gpt2_profile      70 110 sh -c "\"$PY\" benchmarks/throughput.py gpt2 --compile=auto --set model.vocab_size=50257 \
                               --steps 8 --warmup 3 --profile $EXTRA >> \"$OUT/profile.txt\" 2>&1"
stage gpt2_cudnn        80 130 "$PY" benchmarks/throughput.py gpt2 --compile=auto --set model.vocab_size=50257 \
    --set 'model.attention="cudnn"' --steps 50 --warmup 15 $EXTRA
stage gpt2_padded      100 160 "$PY" benchmarks/throughput.py gpt2 --compile=auto --steps 50 --warmup 15 $EXTRA
stage resnet_device     70 120 "$PY" benchmarks/throughput.py resnet --compile=auto --set 'data.hold="device"' $EXTRA
stage resnet_bs32_x8    60  90 "$PY" benchmarks/throughput.py resnet --batch 32 --concurrent 8 --steps 150 --warmup 50 $EXTRA
stage resnet_bs32_x8_mps 60 90 bash benchmarks/with_mps.sh "$PY" benchmarks/throughput.py resnet --batch 32 --concurrent 8 \
    --steps 150 --warmup 50 $EXTRA
stage resnet_eager      40  90 "$PY" benchmarks/throughput.py resnet $EXTRA
stage gpt2_eager        50 100 "$PY" benchmarks/throughput.py gpt2 --steps 50 --warmup 15 $EXTRA
stage tv                20  60 sh -c "\"$PY\" benchmarks/tv_throughput.py --device ${TV_DEVICE:-cuda} --width ${TV_WIDTH:-64} --n ${TV_N:-8192} > \"$OUT/tv_throughput.txt\" 2>&1"
stage resnet_profile    40  80 sh -c "\"$PY\" benchmarks/throughput.py resnet --compile=auto --steps 30 --profile $EXTRA >> \"$OUT/profile.txt\" 2>&1"
"$PY" benchmarks/gpu_summary.py "$OUT"
