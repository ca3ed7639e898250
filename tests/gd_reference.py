"""The oracle: guided-diffusion's own modules (PyPI guided-diffusion-sdk), built from our configs.

`reference_model(config)` (bench/gd_oracle.py, which the benchmarks share: bench/ is put on
sys.path here too, for scripts that import this module outside pytest) constructs
guided_diffusion.unet's networks with the hyper-parameters of an admrt ModelConfig.
RELEASED_FLAGS holds the flags of guided-diffusion's README for each released checkpoint,
passed through its script_util, to check that our presets are those models.
"""
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)
_BENCH = str(Path(__file__).resolve().parents[1] / "bench")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

from guided_diffusion import script_util  # noqa: E402

import torch  # noqa: E402

import admrt  # noqa: E402
from gd_oracle import reference_model  # noqa: E402


def random_model(preset):
    """A tiny admrt model with no zero-initialised layer left (so every path shows in outputs)."""
    torch.manual_seed(0)
    model = admrt.create_model(preset)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval()


def oracle_twin(model):
    """guided-diffusion's network with the same weights as an admrt model."""
    ref = reference_model(model.config)
    ref.load_state_dict(model.state_dict())
    return ref.eval()


_ADM = dict(attention_resolutions="32,16,8", learn_sigma=True, resblock_updown=True,
            use_scale_shift_norm=True, use_fp16=False, use_checkpoint=False, channel_mult="",
            num_heads_upsample=-1, dropout=0.0, use_new_attention_order=False)


def _unet(**flags):
    args = {**_ADM, **flags}
    return lambda: script_util.create_model(**args)


def _sr(**flags):
    args = dict(learn_sigma=True, class_cond=True, use_checkpoint=False, num_heads_upsample=-1,
                use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False, **flags)
    return lambda: script_util.sr_create_model(**args)


def _clf(image_size, depth=2):
    return lambda: script_util.create_classifier(
        image_size=image_size, classifier_use_fp16=False, classifier_width=128, classifier_depth=depth,
        classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention")


# README flags of each released checkpoint, by our preset name.
RELEASED_FLAGS = {
    "imagenet64-cond": _unet(image_size=64, num_channels=192, num_res_blocks=3, num_heads=4,
                             num_head_channels=64, class_cond=True, dropout=0.1,
                             use_new_attention_order=True),
    "imagenet128-cond": _unet(image_size=128, num_channels=256, num_res_blocks=2, num_heads=4,
                              num_head_channels=-1, class_cond=True),
    "imagenet256-cond": _unet(image_size=256, num_channels=256, num_res_blocks=2, num_heads=4,
                              num_head_channels=64, class_cond=True),
    "imagenet256-uncond": _unet(image_size=256, num_channels=256, num_res_blocks=2, num_heads=4,
                                num_head_channels=64, class_cond=False),
    "imagenet512-cond": _unet(image_size=512, num_channels=256, num_res_blocks=2, num_heads=4,
                              num_head_channels=64, class_cond=True),
    "lsun256": _unet(image_size=256, num_channels=256, num_res_blocks=2, num_heads=4,
                     num_head_channels=64, class_cond=False, dropout=0.1),
    "upsample64-256": _sr(large_size=256, small_size=64, num_channels=192, num_res_blocks=2,
                          num_heads=4, num_head_channels=-1, attention_resolutions="32,16,8"),
    "upsample128-512": _sr(large_size=512, small_size=128, num_channels=192, num_res_blocks=2,
                           num_heads=4, num_head_channels=64, attention_resolutions="32,16"),
    "imagenet64-classifier": _clf(64, depth=4),
    "imagenet128-classifier": _clf(128),
    "imagenet256-classifier": _clf(256),
    "imagenet512-classifier": _clf(512),
}
