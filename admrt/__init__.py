"""admrt: a compiled sampling engine for ADM (Dhariwal & Nichol, 2021, "Diffusion Models Beat
GANs on Image Synthesis"), compatible with openai/guided-diffusion's released checkpoints.

    model = admrt.load_model("256x256_diffusion.pt", preset="imagenet256-cond")
    eng = admrt.Engine(model, classifier=clf, backend="eager", dtype="fp16")
    out = eng.sample(classes=[1, 2, 3], steps="ddim25", guidance=1.0, seeds=[7, 8, 9])
"""
from .config import DiffusionConfig, ModelConfig, Preset
from .presets import PRESETS, get_preset
from .checkpoint import create_model, load_model, save_model
from .gd_flags import parse_flags, preset_from_flags

__version__ = "0.1.0"

__all__ = ["DiffusionConfig", "ModelConfig", "Preset", "PRESETS", "get_preset",
           "create_model", "load_model", "save_model", "preset_from_flags", "parse_flags", "Engine"]


def __getattr__(name):
    # The Engine pulls in the C++ core; import it only when asked for.
    if name == "Engine":
        from .engine import Engine
        return Engine
    raise AttributeError(f"module 'admrt' has no attribute {name!r}")
