"""Run by test_ddp.py under `torch.distributed.run` (2 processes, gloo): one training step of
a tiny upsampler; rank 0 saves the gradients, the loss and the importance sampler's history."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import admrt  # noqa: E402
from admrt.distributed import leaving_process_group  # noqa: E402
from admrt.training import TrainConfig, Trainer, init_distributed  # noqa: E402
from conftest import TinyData, tiny_preset  # noqa: E402


def make_trainer(microbatch: int) -> Trainer:
    torch.manual_seed(0)
    model = admrt.create_model(tiny_preset("upsampler"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = TrainConfig("upsampler", steps=1, batch_size=8, microbatch=microbatch, lr=2e-3,
                      ema_rates=(), schedule_sampler="loss-second-moment")
    return Trainer(model, TinyData(), cfg, device="cpu")


def result(tr: Trainer, metrics: dict) -> dict[str, torch.Tensor]:
    out = {f"grad/{k}": p.grad.detach().clone() for k, p in tr.model.named_parameters()}
    out["loss"] = torch.as_tensor(metrics["loss"]).detach().clone()
    out["history"] = tr.sampler.loss_history.clone()
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, world, _ = init_distributed()
    with leaving_process_group():  # both ranks wait for rank 0's save, then leave together
        tr = make_trainer(microbatch=2)
        res = result(tr, tr.train())
        if rank == 0:
            torch.save(res, sys.argv[1])
