"""The C++ sampler against guided-diffusion's loops: same random weights, reference noise.

The oracle runs guided_diffusion's SpacedDiffusion.p_sample_loop / ddim_sample_loop with its own
modules (bench/gd_oracle.py, tests/gd_reference.py) and the classifier_sample.py cond_fn; admrt runs Engine.sample.
Both start from torch.manual_seed(SEED), so they draw the same noise in the same order.
"""
import pytest
import torch

import admrt
from admrt.config import DiffusionConfig
from gd_oracle import reference_sample
from gd_reference import oracle_twin, random_model

SEED = 1234
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    cond, uncond, clf = random_model("tiny-cond"), random_model("tiny-uncond"), random_model("tiny-classifier")
    return {"cond": (cond, oracle_twin(cond)), "uncond": (uncond, oracle_twin(uncond)),
            "clf": (clf, oracle_twin(clf))}


def _reference_samples(ref_model, ref_clf, variance, steps, y, scale, shape):
    return reference_sample(ref_model, ref_clf, admrt.get_preset("tiny-cond"), steps, scale, y, shape,
                            torch.device("cpu"), seed=SEED, variance=variance)


@pytest.mark.parametrize("kind,steps,scale,variance", [
    ("cond", "25", 0.0, "learned_range"), ("cond", "25", 3.0, "learned_range"),
    ("cond", "ddim10", 0.0, "learned_range"), ("cond", "ddim10", 3.0, "learned_range"),
    ("uncond", "25", 3.0, "fixed_large"), ("uncond", "ddim10", 0.0, "fixed_large"),
    ("uncond", "10", 0.0, "fixed_small"),
])
def test_loop_matches_guided_diffusion(tiny, kind, steps, scale, variance):
    model, ref_model = tiny[kind]
    clf, ref_clf = tiny["clf"]
    y = torch.tensor([3, 7])
    shape = (2, 3, 16, 16)
    expected = _reference_samples(ref_model, ref_clf, variance, steps, y, scale, shape)

    eng = admrt.Engine(model, classifier=clf if scale else None, backend="eager")
    torch.manual_seed(SEED)  # reference noise from the global generator, seeded as the oracle was
    labelled = kind == "cond" or scale != 0
    out = eng.sample(classes=y.tolist() if labelled else None, num=2, steps=steps, guidance=scale,
                     noise="reference", batch_size=2, keep_float=True, variance=variance)
    diff = (torch.from_numpy(out.samples) - expected).abs().max().item()
    assert diff <= TOL, f"{kind} {steps} guidance={scale}: max abs diff {diff}"
    expected_u8 = ((expected + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert out.images.shape == (2, 16, 16, 3) and out.images.dtype.name == "uint8"
    assert (torch.from_numpy(out.images).int() - expected_u8.int()).abs().max() <= 1
    assert (out.labels.tolist() if labelled else out.labels) == ([3, 7] if labelled else None)


def test_reference_seed_uses_own_generator(tiny):
    """noise='reference' with a seed: a generator seeded like torch.manual_seed(seed)."""
    model, ref_model = tiny["cond"]
    y = torch.tensor([1, 2])
    expected = _reference_samples(ref_model, None, "learned_range", "ddim10", y, 0.0, (2, 3, 16, 16))
    out = admrt.Engine(model, backend="eager").sample(classes=[1, 2], steps="ddim10", noise="reference", seeds=SEED)
    expected_u8 = ((expected + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (torch.from_numpy(out.images).int() - expected_u8.int()).abs().max() <= 1


def test_diffusion_config_taken_from_preset(tiny):
    model, _ = tiny["cond"]
    assert admrt.Engine(model, backend="eager").base.diffusion == model.preset.diffusion == DiffusionConfig()
