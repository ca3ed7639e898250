"""admrt.training: train ADM's diffusion UNet, noisy classifier and upsampler on real data.

    from admrt.training import FashionMNIST, TrainConfig, Trainer
    model = admrt.create_model("fashion16-cond")
    Trainer(model, FashionMNIST("train", 16), TrainConfig("diffusion", steps=4000, batch_size=256,
            lr=2e-4, ema_rates=(0.999,)), out_dir="runs/base").train()

Modules: config (TrainConfig), loop (Trainer), tasks (the three networks' losses per batch,
evaluate), checkpoints (the run folder's files), losses, ema, data.

CLI: `admrt train diffusion|classifier|upsampler --data fashion-mnist|PATH ...`; multi-GPU with
`torchrun --nproc_per_node N -m admrt.training.cli ...`. Recipes of the bundled models:
training/RECIPES.md.
"""
from .checkpoints import latest_checkpoint
from .config import TrainConfig
from .data import FashionMNIST, ImageFolder, load_fashion_mnist, make_dataset
from .ema import EMA
from .loop import Trainer, init_distributed
from .losses import (LossSecondMomentSampler, UniformSampler, classifier_losses, diffusion_losses,
                     make_sampler)
from .tasks import evaluate

__all__ = ["FashionMNIST", "ImageFolder", "load_fashion_mnist", "make_dataset", "EMA",
           "LossSecondMomentSampler", "UniformSampler", "classifier_losses", "diffusion_losses",
           "make_sampler", "TrainConfig", "Trainer", "evaluate", "init_distributed", "latest_checkpoint"]
