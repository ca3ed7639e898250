"""Every released preset has the reference's state-dict keys and shapes, and its size."""
import pytest
import torch

import admrt
from admrt.presets import PRESETS
from gd_reference import RELEASED_FLAGS, reference_model


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(RELEASED_FLAGS))
def test_released_preset_matches_reference_keys_and_shapes(name):
    with torch.device("meta"):
        ours = admrt.create_model(name)
        theirs = RELEASED_FLAGS[name]()  # README flags through guided-diffusion's script_util
    ours_shapes, ref_shapes = _shapes(ours), _shapes(theirs)
    assert list(ours_shapes) == list(ref_shapes)  # same keys in the same order
    assert ours_shapes == ref_shapes
    published = PRESETS[name].params_m
    if published is not None:
        assert sum(p.numel() for p in ours.parameters()) / 1e6 == pytest.approx(published, abs=0.05)


def test_imagenet256_cond_has_553_8m_parameters():
    with torch.device("meta"):
        model = admrt.create_model("imagenet256-cond")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 553.8


@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if p.checkpoint is None))
def test_other_presets_match_reference_constructor(name):
    with torch.device("meta"):
        ours = admrt.create_model(name)
        theirs = reference_model(PRESETS[name].model)
    assert _shapes(ours) == _shapes(theirs)
