"""Tiny presets and helpers shared by the training tests (CPU, 1-channel 8x8 images)."""
from __future__ import annotations

import pytest
import torch

from admrt.config import DiffusionConfig, ModelConfig, Preset

SHORT = DiffusionConfig(steps=10, noise_schedule="cosine")  # the importance sampler warms up fast


def tiny_preset(task: str, *, dropout: float = 0.0, diffusion: DiffusionConfig = SHORT) -> Preset:
    common = dict(image_size=8, in_channels=1, model_channels=32, num_res_blocks=1,
                  attention_resolutions=(4,), channel_mult=(1, 1), num_head_channels=32, dropout=dropout)
    if task == "diffusion":
        cfg = ModelConfig(kind="unet", out_channels=2, num_classes=3, **common)
    elif task == "upsampler":
        cfg = ModelConfig(kind="superres", out_channels=2, num_classes=3, low_res_size=4, **common)
    else:
        cfg = ModelConfig(kind="classifier", out_channels=3, pool="attention", **common)
    return Preset(f"test-{task}", cfg, diffusion)


class TinyData(torch.utils.data.Dataset):
    """n fixed random 'images' in [-1, 1] with labels in {0, 1, 2}, held in memory."""

    num_classes = 3

    def __init__(self, n: int = 16, size: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        base = torch.linspace(-1, 1, size).view(1, 1, size).expand(n, size, size)
        # class-dependent structure so the classifier has something to learn
        self.images = torch.stack([base, base.transpose(1, 2), -base], dim=1)[torch.arange(n), self.labels]
        self.images = (self.images.unsqueeze(1) + 0.1 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train ~10x faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_data():
    return TinyData()


@pytest.fixture
def make_preset():
    return tiny_preset
