"""admrt as a drop-in for guided-diffusion users, against guided-diffusion itself (the oracle):
x_0-predicting and rescaled-timestep models, every DiffusionConfig field honoured, guided-diffusion's
own modules in the Engine, checkpoints from their flags (preset_from_flags, `admrt sample
--gd-flags`), and the attributes and conversion methods their code reads."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch

import admrt
from admrt.config import DiffusionConfig, ModelConfig
from admrt.diffusion import build_tables, q_sample
from admrt.engine import ModelInfo
from admrt.training.losses import diffusion_losses
from gd_oracle import reference_model, reference_sample, to_uint8_nhwc
from gd_reference import oracle_twin, random_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion import script_util

SEED = 1234
TOL = 1e-4  # the sampler's float32 loop against the reference's (test_sampler_parity.py)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    cond, uncond, clf = random_model("tiny-cond"), random_model("tiny-uncond"), random_model("tiny-classifier")
    return {"cond": (cond, oracle_twin(cond)), "uncond": (uncond, oracle_twin(uncond)),
            "clf": (clf, oracle_twin(clf))}


def _engine_vs_oracle(model, ref_model, clf, ref_clf, diffusion, steps, method, scale, labelled=True):
    preset = dataclasses.replace(model.preset, diffusion=diffusion)
    y = torch.tensor([3, 7])
    expected = reference_sample(ref_model, ref_clf if scale else None, preset, steps, scale, y,
                                (2, 3, 16, 16), CPU, seed=SEED, method=method)
    eng = admrt.Engine(model, classifier=clf if scale else None, diffusion=diffusion, backend="eager")
    out = eng.sample(classes=y.tolist() if labelled else None, num=2, steps=steps, method=method, guidance=scale,
                     noise="reference", seeds=SEED, keep_float=True)
    return (torch.from_numpy(out.samples) - expected).abs().max().item()


# --- 1. every DiffusionConfig field, against the oracle ------------------------------------------

@pytest.mark.parametrize("predict_xstart,rescale_timesteps,schedule", [
    (True, False, "linear"), (False, True, "linear"), (True, True, "cosine")])
@pytest.mark.parametrize("steps,method,scale", [
    ("25", None, 0.0), ("25", None, 3.0), ("ddim10", None, 3.0), ("10", "ddim", 3.0)])
def test_x0_and_rescaled_timestep_loops_match_guided_diffusion(tiny, predict_xstart, rescale_timesteps, schedule,
                                                               steps, method, scale):
    """ModelMeanType.START_X and rescale_timesteps, DDPM (condition_mean) and DDIM (condition_score,
    also use_ddim over a plain respacing), guided and not."""
    (model, ref_model), (clf, ref_clf) = tiny["cond"], tiny["clf"]
    d = DiffusionConfig(noise_schedule=schedule, predict_xstart=predict_xstart, rescale_timesteps=rescale_timesteps)
    assert _engine_vs_oracle(model, ref_model, clf, ref_clf, d, steps, method, scale) <= TOL


@pytest.mark.parametrize("steps", ["10", "ddim10"])
def test_sigma_small_model_matches_guided_diffusion(tiny, steps):
    """A fixed-sigma model trained with sigma_small samples with beta~_t by default."""
    (model, ref_model), (clf, ref_clf) = tiny["uncond"], tiny["clf"]
    d = DiffusionConfig(sigma_small=True, predict_xstart=True)
    assert _engine_vs_oracle(model, ref_model, clf, ref_clf, d, steps, None, 2.0, labelled=True) <= TOL


def test_training_feeds_the_network_the_reference_timesteps():
    """rescale_timesteps in training: the network sees t * 1000 / T as guided-diffusion's
    training_losses feeds it (its _WrappedModel)."""
    from admrt.diffusion import model_timesteps
    t = torch.tensor([0, 17, 399])
    for rescale in (False, True):
        ref = script_util.create_gaussian_diffusion(steps=400, rescale_timesteps=rescale)
        seen = []
        ref.training_losses(lambda x, ts, **kw: seen.append(ts) or torch.zeros_like(x), torch.zeros(3, 3, 4, 4), t)
        got = model_timesteps(build_tables(DiffusionConfig(steps=400, rescale_timesteps=rescale)), t)
        assert got.dtype == seen[0].dtype and torch.equal(got, seen[0])


SAMPLING_FIELDS = {"steps": 1000, "noise_schedule": "cosine", "predict_xstart": True, "rescale_timesteps": True,
                   "sigma_small": True}
TRAINING_FIELDS = {"use_kl": True, "rescale_learned_sigmas": True}


def test_every_diffusion_field_changes_what_it_governs(tiny):
    """No DiffusionConfig field is accepted and ignored: each one, changed from its default, changes
    the samples (sampling fields) or the training loss (training fields); a new field must be added
    to one of the two lists (and to the oracle tests above or in tests/training/test_losses.py)."""
    names = {f.name for f in dataclasses.fields(DiffusionConfig)}
    assert names == set(SAMPLING_FIELDS) | set(TRAINING_FIELDS)
    model = tiny["uncond"][0]  # fixed sigma: sigma_small shows

    def sample(**fields):
        d = DiffusionConfig(**{"steps": 500, **fields})  # T != 1000, so rescale_timesteps shows
        return admrt.Engine(model, diffusion=d, backend="eager").sample(num=2, steps="10", seeds=3, keep_float=True).samples

    base = sample()
    for name, value in SAMPLING_FIELDS.items():
        assert np.abs(sample(**{name: value}) - base).max() > 1e-3, name

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise, t = torch.randn(x0.shape, generator=g), torch.tensor([0, 5, 100, 300])
    out = torch.randn(4, 6, 8, 8, generator=g)

    def loss(d):
        tables = build_tables(d)
        return diffusion_losses(tables, out, x0, q_sample(tables, x0, t, noise), t, noise, d)["loss"]

    base = loss(DiffusionConfig(steps=500))
    for name, value in TRAINING_FIELDS.items():
        assert (loss(DiffusionConfig(steps=500, **{name: value})) - base).abs().max() > 1e-3, name


def test_diffusion_config_rejects_non_booleans():
    with pytest.raises(ValueError, match="predict_xstart='yes'"):
        DiffusionConfig(predict_xstart="yes")


# --- 2. guided-diffusion's own modules in the Engine ---------------------------------------------

def test_engine_over_guided_diffusion_unet_and_classifier_matches_oracle(tiny):
    (_, ref_model), (_, ref_clf) = tiny["cond"], tiny["clf"]
    assert not hasattr(ref_clf, "image_size")  # guided-diffusion's EncoderUNetModel drops it
    info = ModelInfo.of(ref_clf, "classifier")
    assert (info.kind, info.image_size, info.in_channels, info.out_channels) == ("classifier", 16, 3, 10)
    preset = admrt.get_preset("tiny-cond")
    y = torch.tensor([3, 7])
    for steps in ("25", "ddim10"):
        expected = reference_sample(ref_model, ref_clf, preset, steps, 3.0, y, (2, 3, 16, 16), CPU, seed=SEED)
        eng = admrt.Engine(ref_model, classifier=ref_clf, diffusion=preset.diffusion, backend="eager")
        out = eng.sample(classes=[3, 7], steps=steps, guidance=3.0, noise="reference", seeds=SEED, keep_float=True)
        assert (torch.from_numpy(out.samples) - expected).abs().max().item() <= TOL, steps
    # fp16 through the modules' own convert_to_fp16, on inference copies
    half = admrt.Engine(ref_model, classifier=ref_clf, diffusion=preset.diffusion, dtype="fp16", backend="eager")
    low = half.sample(classes=[3, 7], steps="ddim10", guidance=3.0, seeds=SEED, keep_float=True)
    full = admrt.Engine(ref_model, classifier=ref_clf, diffusion=preset.diffusion, backend="eager").sample(
        classes=[3, 7], steps="ddim10", guidance=3.0, seeds=SEED, keep_float=True)
    assert 0 < np.abs(low.samples - full.samples).max() < 0.1
    assert ref_model.dtype == torch.float32 and next(ref_model.parameters()).dtype == torch.float32


def test_engine_over_guided_diffusion_superres_equals_admrt_superres(tiny):
    """A guided-diffusion SuperResModel (whose in_channels counts x_t and low_res) as the upsampler
    gives the images of the admrt upsampler with the same weights."""
    base = random_model(ModelConfig(kind="unet", image_size=8, model_channels=32, out_channels=6, num_res_blocks=1,
                                    attention_resolutions=(4,), channel_mult=(1, 2), num_classes=10,
                                    num_head_channels=16))
    up = random_model("tiny-upsample")
    ref_up = oracle_twin(up)
    info = ModelInfo.of(ref_up, "upsampler")
    assert (info.kind, info.in_channels, info.out_channels, info.learn_sigma) == ("superres", 3, 6, True)
    kwargs = dict(classes=[1, 2, 5], steps="ddim4", seeds=9, keep_float=True)
    want = admrt.Engine(base, upsampler=up, backend="eager").sample(**kwargs)
    got = admrt.Engine(base, upsampler=ref_up, upsampler_diffusion=up.preset.diffusion, backend="eager").sample(**kwargs)
    assert np.abs(got.samples - want.samples).max() <= TOL  # 0 on the torch path; the fused one rounds
    assert (got.base_images == want.base_images).all()


def test_guided_diffusion_classifier_of_any_pool_and_misfits():
    cfg = ModelConfig(kind="classifier", image_size=16, model_channels=32, out_channels=10, num_res_blocks=1,
                      attention_resolutions=(8,), channel_mult=(1, 2), num_head_channels=16, pool="adaptive")
    ref = reference_model(cfg)
    assert ModelInfo.of(ref, "classifier").image_size is None  # an adaptive pool takes any size
    model = random_model("tiny-cond")
    assert admrt.Engine(model, classifier=ref, backend="eager").classifier_info.image_size == 16
    big = reference_model(dataclasses.replace(cfg, image_size=32, pool="attention"))
    with pytest.raises(ValueError, match="classifier: it classifies 32x32 images, but the model samples 16x16"):
        admrt.Engine(model, classifier=big, backend="eager")
    with pytest.raises(TypeError, match="classifier: expected an admrt model"):
        admrt.Engine(model, classifier=torch.nn.Linear(2, 2), backend="eager")


# --- 3. presets from guided-diffusion's flags ----------------------------------------------------

# guided-diffusion README's MODEL_FLAGS (and classifier flags) of each release, verbatim.
_M = "--attention_resolutions 32,16,8 --class_cond {cond} --diffusion_steps 1000 --image_size {size} " \
     "--learn_sigma True --noise_schedule {sched} --num_channels 256 --num_head_channels 64 --num_res_blocks 2 " \
     "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
README_FLAGS = {
    "imagenet64-cond": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                       "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
                       "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
                       "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
    "imagenet128-cond": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
                        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 "
                        "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "imagenet256-cond": _M.format(cond=True, size=256, sched="linear"),
    "imagenet256-uncond": _M.format(cond=False, size=256, sched="linear"),
    "imagenet512-cond": _M.format(cond=True, size=512, sched="linear").replace("--use_fp16 True",
                                                                                "--use_fp16 False"),
    "upsample64-256": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256  "
                      "--small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 "
                      "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True",
    "upsample128-512": "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 "
                       "--small_size 128 --learn_sigma True --noise_schedule linear --num_channels 192 "
                       "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                       "--use_scale_shift_norm True",
    "lsun256": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 "
               "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
               "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
               "--use_scale_shift_norm True",
    "imagenet64-classifier": "--classifier_depth 4 --image_size 64",
    # README's CLASSIFIER_FLAGS (128x128; "modify these for ... other resolutions")
    **{f"imagenet{size}-classifier": f"--image_size {size} --classifier_attention_resolutions 32,16,8 "
                                     "--classifier_depth 2 --classifier_width 128 --classifier_pool attention "
                                     "--classifier_resblock_updown True --classifier_use_scale_shift_norm True"
       for size in (128, 256, 512)},
}


@pytest.mark.parametrize("name", sorted(README_FLAGS))
def test_preset_from_flags_names_every_release(name):
    preset = admrt.preset_from_flags(**admrt.parse_flags(README_FLAGS[name]))
    assert preset.name == name
    assert preset.model == admrt.get_preset(name).model
    assert preset.diffusion == admrt.get_preset(name).diffusion


def test_classifier_sample_flags_give_model_and_classifier():
    """classifier_sample.py's one flag string holds both networks' flags."""
    flags = admrt.parse_flags(README_FLAGS["imagenet64-cond"] + " --classifier_scale 1.0 --classifier_path c.pt "
                              "--classifier_depth 4 --model_path m.pt --batch_size 4 --num_samples 100 "
                              "--timestep_respacing 250")
    assert admrt.preset_from_flags("unet", **flags).name == "imagenet64-cond"
    clf = admrt.preset_from_flags("classifier", **flags)
    assert clf.name == "imagenet64-classifier" and clf.diffusion.noise_schedule == "cosine"


CUSTOM = {
    "unet-multihead-x0": dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                              attention_resolutions="16,8", num_heads=2, class_cond=True, learn_sigma=True,
                              predict_xstart=True, noise_schedule="cosine", resblock_updown=True),
    "unet-plain-fixed-sigma": dict(image_size=32, num_channels=32, num_res_blocks=2, channel_mult="1,1,2",
                                   attention_resolutions="8", use_scale_shift_norm=False, num_head_channels=16,
                                   num_heads_upsample=2, use_new_attention_order=True, rescale_timesteps=True),
    "classifier-spatial": dict(image_size=64, classifier_width=32, classifier_depth=1,
                               classifier_attention_resolutions="8", classifier_pool="spatial_v2",
                               classifier_resblock_updown=False),
    # channel_mult and use_new_attention_order are not read by sr_create_model
    "superres": dict(large_size=64, small_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="8",
                     num_head_channels=16, class_cond=True, learn_sigma=True, channel_mult="1,2",
                     use_new_attention_order=True),
}


def _gd_network(flags, kind=None):
    """guided-diffusion's own network for a flag set, built as its scripts build it (each script
    reads the flags of its defaults)."""
    kind = kind or admrt.gd_flags.infer_kind(flags)
    defaults, build = {
        "classifier": (script_util.classifier_defaults(), script_util.create_classifier),
        "superres": (script_util.sr_model_and_diffusion_defaults(),
                     lambda **a: script_util.sr_create_model_and_diffusion(**a)[0]),
        "unet": (script_util.model_and_diffusion_defaults(),
                 lambda **a: script_util.create_model_and_diffusion(**a)[0]),
    }[kind]
    return build(**{**defaults, **{k: v for k, v in flags.items() if k in defaults}})


@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_custom_checkpoint_loads_strict_from_its_flags_and_matches_forward(name, tmp_path):
    flags = CUSTOM[name]
    torch.manual_seed(0)
    ref = _gd_network(flags).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    path = tmp_path / "model.pt"
    torch.save(ref.state_dict(), path)
    preset = admrt.preset_from_flags(**flags)
    assert preset.name.startswith("gd-flags-")
    model = admrt.load_model(path, preset=preset)  # strict: every key and shape
    c = preset.model
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, c.image_size, c.image_size, generator=g)
    t = torch.tensor([10, 900])
    kwargs = {}
    if c.num_classes:
        kwargs["y"] = torch.tensor([1, 999])
    if c.kind == "superres":
        kwargs["low_res"] = torch.randn(2, 3, c.low_res_size, c.low_res_size, generator=g)
    with torch.no_grad():
        want, got = ref(x, t, **kwargs), model(x, t, **kwargs)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_num_heads_trap_loads_both_ways_with_other_outputs(tmp_path):
    """The reference's known trap: num_heads changes no weight shape, so a checkpoint loads under a
    wrong value and gives other outputs; only the flags can say which is right (gd_flags docstring)."""
    flags = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16")
    torch.manual_seed(0)
    ref = _gd_network({**flags, "num_heads": 4}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    outs = {}
    for heads in (1, 4):
        m = admrt.load_model(tmp_path / "m.pt", preset=admrt.preset_from_flags(**flags, num_heads=heads))
        with torch.no_grad():
            outs[heads] = m(x, t)
    with torch.no_grad():
        assert torch.allclose(outs[4], ref(x, t), atol=1e-5)
    assert (outs[1] - outs[4]).abs().max() > 1e-3


@pytest.mark.parametrize("text,message", [
    ("--image_sise 64", "flag 'image_sise': not a guided-diffusion flag; did you mean 'image_size'?"),
    ("--learn_sigma maybe", "learn_sigma='maybe': expected a boolean"),
    ("--num_channels 12.5", "num_channels='12.5': expected an int"),
    ("--learn_sigma", "--learn_sigma: no value"),
    ("image_size 64", "'image_size': expected '--name value' pairs"),
])
def test_flag_errors_name_the_flag(text, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("(", r"\(")):
        admrt.parse_flags(text)


def test_flags_for_a_size_guided_diffusion_does_not_build():
    with pytest.raises(ValueError, match="image_size=48: guided-diffusion builds a unet only for sizes"):
        admrt.preset_from_flags(image_size=48)
    assert admrt.preset_from_flags(image_size=48, channel_mult="1,2").model.channel_mult == (1, 2)
    assert admrt.parse_flags("--use_fp16=yes --lr 3e-4") == {"use_fp16": True, "lr": 3e-4}


# --- 4. the attributes and conversions guided-diffusion code reads -------------------------------

ATTRIBUTES = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
              "attention_resolutions", "dropout", "channel_mult", "conv_resample", "num_classes", "use_checkpoint",
              "dtype", "num_heads", "num_head_channels", "num_heads_upsample")


@pytest.mark.parametrize("preset", ["tiny-cond", "tiny-uncond", "tiny-upsample", "tiny-classifier"])
def test_guided_diffusion_attributes(preset):
    model = admrt.create_model(preset)
    ref = reference_model(model.config)
    for name in ATTRIBUTES:
        if not hasattr(ref, name):  # guided-diffusion's classifier has no image_size, num_classes
            assert model.config.kind == "classifier" and name in ("image_size", "num_classes")
            continue
        want = getattr(ref, name)
        assert getattr(model, name) == (tuple(want) if isinstance(want, (list, tuple)) else want), name
    if model.config.kind == "classifier":
        assert model.pool == ref.pool


@pytest.mark.parametrize("preset", ["tiny-cond", "tiny-classifier"])
def test_convert_to_fp16_is_the_reference_precision_policy(preset):
    """Ours after convert_to_fp16 is as close to the fp32 network as guided-diffusion's after its own
    (at most 2x its error, the kernels' rule), and converts the same convolutions."""
    model = random_model(preset)
    ref = reference_model(model.config, use_fp16=True)
    ref.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 600])
    y = {"y": torch.tensor([1, 2])} if model.config.num_classes else {}
    with torch.no_grad():
        exact = model(x, t, **y).double()
    ref.eval().convert_to_fp16()
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    convs = [m for m in model.input_blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.dtype == torch.float16 for c in convs)
    ref_convs = [m for m in ref.input_blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.weight.dtype for c in convs] == [c.weight.dtype for c in ref_convs]
    with torch.no_grad():
        got, want = model(x, t, **y).double(), ref(x, t, **y).double()

    def rel(a):
        return ((a - exact).norm() / exact.norm()).item()
    assert 0 < rel(got) <= 2 * rel(want) + 1e-4
    model.convert_to_fp32()
    assert model.dtype == torch.float32 and all(c.weight.dtype == torch.float32 for c in convs)


# --- 5. `admrt sample --gd-flags`: their command line, their images ------------------------------

MODEL_FLAGS = ("--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 32 "
               "--num_head_channels 32 --class_cond True --learn_sigma True --resblock_updown True "
               "--predict_xstart True --noise_schedule cosine")
CLASSIFIER_FLAGS = ("--classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8 "
                    "--classifier_scale 2.0")


@pytest.mark.parametrize("sample_flags,method", [("--timestep_respacing 6", None),
                                                 ("--timestep_respacing 6 --use_ddim True", "ddim")])
def test_sample_cli_from_gd_flags_gives_the_reference_images(tmp_path, sample_flags, method):
    torch.manual_seed(0)
    flags = admrt.parse_flags(MODEL_FLAGS + " " + CLASSIFIER_FLAGS)
    ref_model, ref_clf = _gd_network(flags, "unet").eval(), _gd_network(flags, "classifier").eval()
    with torch.no_grad():
        for p in list(ref_model.parameters()) + list(ref_clf.parameters()):
            p.copy_(torch.randn_like(p) * 0.05)
    torch.save(ref_model.state_dict(), tmp_path / "model.pt")
    torch.save(ref_clf.state_dict(), tmp_path / "clf.pt")

    from admrt.cli import main
    line = (f"{MODEL_FLAGS} {CLASSIFIER_FLAGS} --classifier_path {tmp_path / 'clf.pt'} --model_path "
            f"{tmp_path / 'model.pt'} {sample_flags} --num_samples 2 --batch_size 2")
    assert main(["sample", "--gd-flags", line, "--classes", "5,998", "--noise", "reference", "--seed", "7",
                 "--out", str(tmp_path / "run"), "--no-progress", "--backend", "eager"]) == 0
    got = np.load(tmp_path / "run" / "samples_2x64x64x3.npz")

    preset = admrt.preset_from_flags("unet", **flags)
    expected = reference_sample(ref_model, ref_clf, preset, "6", 2.0, torch.tensor([5, 998]), (2, 3, 64, 64), CPU,
                                seed=7, method=method)
    assert got["arr_1"].tolist() == [5, 998]
    assert np.abs(got["arr_0"].astype(int) - to_uint8_nhwc(expected).numpy().astype(int)).max() <= 1


def test_sample_cli_gd_flags_errors_are_one_line(tmp_path, cli_error):
    assert "--gd-flags: flag 'image_sise': not a guided-diffusion flag" in cli_error(
        ["sample", "--gd-flags", "--image_sise 64", "--out", tmp_path / "a"])
    assert "--gd-flags: no --model_path in the flags; pass --model PATH" in cli_error(
        ["sample", "--gd-flags", "--image_size 64", "--out", tmp_path / "b"])
    assert "pass them as --upsampler-gd-flags" in cli_error(
        ["sample", "--gd-flags", "--large_size 64 --small_size 32", "--out", tmp_path / "c"])
    assert not any((tmp_path / d).exists() for d in "abc")
