"""guided-diffusion's command-line flags -> admrt presets, for checkpoints people trained themselves.

guided-diffusion's scripts build their networks from flags (script_util's
model_and_diffusion_defaults, classifier_defaults, sr_model_and_diffusion_defaults, and the
create_model / create_classifier / sr_create_model rules). `preset_from_flags(**flags)` applies the
same defaults and rules and returns an admrt Preset, so that a custom checkpoint loads strict:

    preset = admrt.preset_from_flags(image_size=64, num_channels=192, num_res_blocks=3,
                                     learn_sigma=True, class_cond=True, ...)
    model = admrt.load_model("ema_0.9999_500000.pt", preset=preset)

`parse_flags("--image_size 64 --learn_sigma True ...")` reads the flag string the scripts take.

The weights cannot tell every flag apart. `num_heads` (with num_head_channels=-1) splits the
attention channels into heads without changing any weight shape, so a checkpoint loads under
num_heads=1 and num_heads=4 alike and gives other images; so do num_head_channels,
num_heads_upsample and use_new_attention_order, and every diffusion flag (diffusion_steps,
noise_schedule, predict_xstart, rescale_timesteps, sigma_small). Those must be the flags the model
was trained with: a strict load proves only the others.
"""
from __future__ import annotations

import difflib
import shlex
from typing import Any

from .config import DiffusionConfig, ModelConfig, Preset, default_channel_mult
from .presets import PRESETS

# guided-diffusion's script defaults (script_util.py): the values its scripts use for flags not given.
DIFFUSION_DEFAULTS = dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
                          use_kl=False, predict_xstart=False, rescale_timesteps=False,
                          rescale_learned_sigmas=False)
MODEL_DEFAULTS = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
                      num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
                      class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
                      use_fp16=False, use_new_attention_order=False)
CLASSIFIER_DEFAULTS = dict(image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
                           classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
                           classifier_resblock_updown=True, classifier_pool="attention")
SR_DEFAULTS = dict(large_size=256, small_size=64)
# create_gaussian_diffusion's keyword that no script exposes; accepted here too.
EXTRA_DIFFUSION = dict(sigma_small=False)
# The scripts' own flags (sampling and training runs): read by `admrt sample --gd-flags`, not by presets.
SCRIPT_DEFAULTS = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="",
                       classifier_path="", classifier_scale=1.0, base_samples="", data_dir="", val_data_dir="",
                       schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0, microbatch=-1,
                       ema_rate="0.9999", log_interval=10, save_interval=10000, resume_checkpoint="",
                       fp16_scale_growth=1e-3, iterations=150000, anneal_lr=False, noised=True, eval_interval=5)
ALL_DEFAULTS = {**DIFFUSION_DEFAULTS, **MODEL_DEFAULTS, **CLASSIFIER_DEFAULTS, **SR_DEFAULTS, **EXTRA_DIFFUSION,
                **SCRIPT_DEFAULTS}

NUM_CLASSES = 1000  # guided-diffusion's script_util.NUM_CLASSES: every class_cond model has 1000 labels
KINDS = ("unet", "superres", "classifier")


def channel_mult_for(image_size: int, kind: str) -> tuple[float, ...]:
    """channel_mult by size, as create_model (channel_mult=""), create_classifier (admrt's
    config.default_channel_mult: the same table) and sr_create_model choose it."""
    sr_table = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
    try:
        if kind != "superres":
            return default_channel_mult(image_size)
        return sr_table[image_size]
    except (KeyError, ValueError):
        size, sizes = ("large_size", sorted(sr_table)) if kind == "superres" else ("image_size", [64, 128, 256, 512])
        raise ValueError(f"{size}={image_size}: guided-diffusion builds a {kind} only for sizes {sizes}"
                         + ("" if kind != "unet" else "; pass channel_mult='1,2,...' for another size")) from None


def _to_bool(name: str, value: Any) -> bool:
    """guided-diffusion's str2bool."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"{name}={value!r}: expected a boolean (True/False, yes/no, 1/0)")


def _typed(name: str, value: Any) -> Any:
    """`value` in the type of the flag's default (as the scripts' argparse types it)."""
    default = ALL_DEFAULTS[name]
    if isinstance(default, bool):
        return _to_bool(name, value)
    try:
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected {'an int' if isinstance(default, int) else 'a number'}") from None
    return str(value)


def normalize_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags with guided-diffusion's names checked (a typo is an error naming the closest
    flag) and values typed as its scripts type them."""
    out = {}
    for name, value in flags.items():
        key = name.lstrip("-").replace("-", "_")
        if key not in ALL_DEFAULTS:
            close = difflib.get_close_matches(key, ALL_DEFAULTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"flag {name!r}: not a guided-diffusion flag{hint}")
        out[key] = _typed(key, value)
    return out


def parse_flags(text: str) -> dict[str, Any]:
    """The flags of a guided-diffusion command line ("--image_size 64 --learn_sigma True ...",
    "--key=value" too), checked and typed (normalize_flags)."""
    words = shlex.split(text)
    flags: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) == 2:
            raise ValueError(f"gd flags: {word!r}: expected '--name value' pairs (as guided-diffusion's scripts take)")
        if "=" in word:
            name, value = word[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(words) or words[i + 1].startswith("--"):
                raise ValueError(f"gd flags: {word}: no value (guided-diffusion's flags all take one, "
                                 "e.g. '--learn_sigma True')")
            name, value = word[2:], words[i + 1]
            i += 2
        flags[name] = value
    return normalize_flags(flags)


def _resolutions(name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(r) for r in str(text).split(","))
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected comma-separated pixel sizes such as '32,16,8'") from None
    if any(v <= 0 for v in values):
        raise ValueError(f"{name}={text!r}: expected positive pixel sizes")
    return values


def infer_kind(flags: dict[str, Any]) -> str:
    """The network a flag set describes: superres with large_size/small_size, classifier with only
    classifier flags, else unet."""
    if "large_size" in flags or "small_size" in flags:
        return "superres"
    model_only = set(MODEL_DEFAULTS) - {"image_size"}
    if any(k in CLASSIFIER_DEFAULTS and k != "image_size" for k in flags) and not model_only & set(flags):
        return "classifier"
    return "unet"


def preset_from_flags(kind: str | None = None, **flags: Any) -> Preset:
    """The admrt Preset of a network guided-diffusion builds from these flags (its scripts'
    defaults for those not given). kind: "unet" (create_model), "superres" (sr_create_model),
    "classifier" (create_classifier); None: inferred (infer_kind). Flags of the other kinds and
    the scripts' own flags (model_path, batch_size, use_ddim, ...) are accepted and not used.

    A flag set equal to a released model's gives that preset (by name); a classifier is matched
    on its network alone (its diffusion only matters to its training, and is kept from the flags).
    Any other gives a preset named "gd-flags-<kind>". timestep_respacing is a sampling choice
    (Engine.sample's steps) and is not part of the preset.
    """
    given = normalize_flags(flags)
    kind = kind or infer_kind(given)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS} or None")
    f = {**ALL_DEFAULTS, **given}  # use_checkpoint and use_fp16 do not change the network's weights
    diffusion = DiffusionConfig(
        steps=f["diffusion_steps"], noise_schedule=f["noise_schedule"], predict_xstart=f["predict_xstart"],
        rescale_timesteps=f["rescale_timesteps"], sigma_small=f["sigma_small"], use_kl=f["use_kl"],
        rescale_learned_sigmas=f["rescale_learned_sigmas"])
    if kind == "classifier":
        size = f["image_size"]
        model = ModelConfig(
            kind="classifier", image_size=size, model_channels=f["classifier_width"], out_channels=NUM_CLASSES,
            num_res_blocks=f["classifier_depth"],
            attention_resolutions=_resolutions("classifier_attention_resolutions",
                                               f["classifier_attention_resolutions"]),
            channel_mult=channel_mult_for(size, kind), num_head_channels=64,
            use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
            resblock_updown=f["classifier_resblock_updown"], pool=f["classifier_pool"])
    else:
        superres = kind == "superres"
        size = f["large_size"] if superres else f["image_size"]
        if superres or f["channel_mult"] == "":
            mult = channel_mult_for(size, kind)  # sr_create_model ignores channel_mult
        else:
            try:
                mult = tuple(int(m) for m in f["channel_mult"].split(","))
            except ValueError:
                raise ValueError(f"channel_mult={f['channel_mult']!r}: expected comma-separated ints or ''") from None
        model = ModelConfig(
            kind=kind, image_size=size, model_channels=f["num_channels"],
            out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=f["num_res_blocks"],
            attention_resolutions=_resolutions("attention_resolutions", f["attention_resolutions"]),
            channel_mult=mult, dropout=f["dropout"], num_classes=NUM_CLASSES if f["class_cond"] else None,
            num_heads=f["num_heads"], num_head_channels=f["num_head_channels"],
            num_heads_upsample=f["num_heads_upsample"], use_scale_shift_norm=f["use_scale_shift_norm"],
            resblock_updown=f["resblock_updown"],
            # sr_create_model takes no use_new_attention_order (nor channel_mult): the legacy order
            use_new_attention_order=f["use_new_attention_order"] and not superres,
            low_res_size=f["small_size"] if superres else None)
    for preset in PRESETS.values():
        if preset.model == model and preset.diffusion == diffusion:
            return preset
        if preset.model == model and kind == "classifier":
            return Preset(preset.name, model, diffusion, preset.description, preset.checkpoint, preset.params_m)
    return Preset(f"gd-flags-{kind}", model, diffusion, "from guided-diffusion flags")
