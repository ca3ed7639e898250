#!/bin/bash
# Trains the three bundled models in parallel on one GPU (see training/RECIPES.md).
ROOT=$PWD
mkdir -p /tmp/dev/admrt
for f in $ROOT/admrt/*; do ln -sf $f /tmp/dev/admrt/; done
for d in kernels training engine export; do ln -sfn $ROOT/$d /tmp/dev/admrt/$d; done
export PYTHONPATH=/tmp/dev PYTHONUNBUFFERED=1
cd /tmp  # so that the repo folder does not shadow the shim on sys.path
nvidia-smi -L; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
T=${TL:-360}
common="--data fashion-mnist --data-root $ROOT/.fmnist --steps 1000000 --time-limit $T --save-every 1000000 --log-every 200 --eval-images 10000"
python -m admrt.training.cli diffusion --preset fashion16-cond --batch-size 256 --lr 2e-4 --ema 0.999 --no-flip \
  $common --out /tmp/runs/base --export $OUT/fashion16-cond.safetensors > $OUT/base.log 2>&1 &
python -m admrt.training.cli classifier --preset fashion16-classifier --batch-size 256 --lr 3e-4 --weight-decay 0.05 \
  $common --out /tmp/runs/clf --export $OUT/fashion16-classifier.safetensors > $OUT/classifier.log 2>&1 &
python -m admrt.training.cli upsampler --preset fashion-upsample16-32 --batch-size 256 --lr 2e-4 --ema 0.999 --no-flip \
  $common --out /tmp/runs/up --export $OUT/fashion-upsample16-32.safetensors > $OUT/upsampler.log 2>&1 &
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
for r in base clf up; do echo "== $r"; cat /tmp/runs/$r/log.csv; cat /tmp/runs/$r/summary.txt; done > $OUT/logs.txt
ls -la $OUT
