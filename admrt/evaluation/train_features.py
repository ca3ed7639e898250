"""Train the bundled Fashion-MNIST feature network (admrt/bundled/fashion_features.safetensors).

    python -m admrt.evaluation.train_features [--epochs 4] [--out PATH]

A `FashionFeatureNet` classifier trained on the training split (60k) with cross-entropy. Inputs
go through exactly the evaluator's path (`fashion_input` on uint8 NHWC images): each batch is
drawn at 32, 16 or 8 pixels (the data pipeline of training/data.py, quantized to uint8), so the
features stay meaningful for samples of the bundled 16x16 models and their upsampled versions.
The test-split accuracy at each resolution is stored in the file's metadata.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .features import BUNDLED_FASHION_FEATURES, FashionFeatureNet, FashionNetConfig

RESOLUTIONS = (32, 16, 8)
RESOLUTION_PROBS = (0.5, 0.35, 0.15)


def fashion_uint8(split: str, size: int, root=None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` as uint8 (N, size, size, 1) through training/data.py's pipeline
    (pad 28 -> 32, area resize), and labels (N,) int64."""
    from admrt.training.data import fashion_to_size, load_fashion_mnist
    images, labels = load_fashion_mnist(split, root)
    x = fashion_to_size(torch.from_numpy(images), size)                 # (N, 1, S, S) in [-1, 1]
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy(), labels


@torch.no_grad()
def accuracy(net: FashionFeatureNet, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(images), batch):
        _, _, logits = net(torch.from_numpy(images[i:i + batch]))
        correct += int((logits.argmax(1).numpy() == labels[i:i + batch]).sum())
    return correct / len(images)


def train(epochs: int = 4, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, root=None,
          limit: int | None = None, log_every: int = 100) -> tuple[FashionFeatureNet, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = {s: fashion_uint8("train", s, root) for s in RESOLUTIONS}
    labels = data[32][1]
    if limit is not None:
        data = {s: (x[:limit], y[:limit]) for s, (x, y) in data.items()}
        labels = labels[:limit]
    n = len(labels)
    net = FashionFeatureNet(FashionNetConfig())
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    step, t0 = 0, time.time()
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            size = int(rng.choice(RESOLUTIONS, p=RESOLUTION_PROBS))
            x = torch.from_numpy(data[size][0][idx])
            if rng.random() < 0.5:
                x = x.flip(2)                                   # horizontal flip (W axis of NHWC)
            _, _, logits = net(x)
            loss = F.cross_entropy(logits, torch.from_numpy(labels[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % log_every == 0:
                print(f"epoch {epoch} step {step}/{total} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    test = {s: fashion_uint8("test", s, root) for s in RESOLUTIONS}
    acc = {str(s): accuracy(net, *test[s]) for s in RESOLUTIONS}
    info = {"test_accuracy": acc, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
            "train_images": n, "train_seconds": round(time.time() - t0, 1)}
    return net.eval(), info


def main(argv=None) -> int:  # noqa: D103
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest for this small net on a shared 2-core machine)")
    p.add_argument("--out", default=str(BUNDLED_FASHION_FEATURES))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, info = train(args.epochs, args.batch_size, args.lr, args.seed, args.data_root, args.limit)
    print(json.dumps(info, indent=1))
    net.save(args.out, metadata={"training": json.dumps(info),
                                 "description": "admrt Fashion-MNIST feature CNN; figures not comparable "
                                                "with Inception-v3 FID/IS"})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
