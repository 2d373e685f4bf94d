#!/usr/bin/env bash
# One call on a lent GPU: the GPU tests (bf16, channels_last, GPU-resident CIFAR, compile, SDPA, TV),
# then the training and TV throughput benchmarks; results under $OUT.
#   run: bash benchmarks/gpu_check.sh        (OUT defaults to ./gpu-check-out)
set -u
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
{
  nvidia-smi || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/device.txt" 2>&1
if ! python -c "import engine, gpctl" 2>/dev/null; then
  pip install -q -e '.[test]' > "$OUT/install.txt" 2>&1
fi
python -m pytest -q -m gpu tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1; echo "gpu tests exit $?" >> "$OUT/gpu_tests.txt"
for args in "resnet" "resnet --compile" "gpt2" "gpt2 --compile"; do
  timeout 240 python benchmarks/throughput.py $args --steps 60 >> "$OUT/throughput.jsonl" 2>> "$OUT/throughput.err"
done
timeout 120 python benchmarks/tv_throughput.py --device cuda --width 64 --n 8192 > "$OUT/tv_throughput.txt" 2>&1
cat "$OUT/gpu_tests.txt" | tail -5
cat "$OUT/tv_throughput.txt"
cat "$OUT/throughput.jsonl"
