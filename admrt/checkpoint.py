"""Creating models from presets, and loading/saving weights.

Two formats:
- guided-diffusion's released `.pt` state dicts: they do not record their config, so a preset
  must be given (`load_model("256x256_diffusion.pt", preset="imagenet256-cond")`);
- ours: `.safetensors` with the preset JSON in its metadata (no pickles).
Loading builds the network on the meta device and assigns the (memory-mapped) tensors in, so
weights are not held twice. Every key and shape is checked first: a wrong preset or a damaged
file is an error naming the first mismatches, never a silent partial load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from .io import atomic_write
from .config import DiffusionConfig, ModelConfig, Preset
from .models import build_model
from .presets import PRESETS, get_preset

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
METADATA_KEY = "admrt_preset"


def _as_preset(spec) -> Preset:
    if isinstance(spec, Preset):
        return spec
    if isinstance(spec, ModelConfig):
        return Preset("custom", spec, DiffusionConfig())
    if isinstance(spec, str):
        return get_preset(spec)
    raise TypeError(f"preset={spec!r}: expected a preset name, a Preset or a ModelConfig")


def _finish(model: nn.Module, preset: Preset, device, dtype) -> nn.Module:
    model.preset = preset
    model.eval()
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.set_dtype(dtype)
    return model


def create_model(preset, *, device=None, dtype=None) -> nn.Module:
    """A randomly initialised network for a preset name, Preset or ModelConfig."""
    p = _as_preset(preset)
    return _finish(build_model(p.model), p, device, dtype)


def bundled_path(name: str) -> Path:
    return BUNDLED_DIR / f"{name}.safetensors"


def load_model(path, preset=None, *, device=None, dtype=None) -> nn.Module:
    """Load weights into the network of their preset.

    path: a `.pt` released checkpoint (preset required), an admrt `.safetensors` file (its
        config is in the metadata; a preset given too must agree), or the name of a bundled
        model (e.g. "fashion16-cond").
    device, dtype: where to put the model and its body precision (fp32|fp16|bf16).
    """
    p = Path(path)
    if not p.exists() and isinstance(path, str) and bundled_path(path).exists():
        p = bundled_path(path)
    if not p.exists():
        hint = f" (bundled models: {sorted(q.stem for q in BUNDLED_DIR.glob('*.safetensors'))})"
        raise FileNotFoundError(f"path={str(path)!r}: no such checkpoint file{hint}")
    if p.is_dir():
        raise ValueError(f"path={str(path)!r}: a folder, not a checkpoint file")
    if p.suffix == ".safetensors" or checkpoint_format(p) == "safetensors":
        state, stored = _read_safetensors(p)
        if preset is None:
            if stored is None:
                raise ValueError(f"path={str(p)!r}: the file records no admrt config; pass preset=...")
            chosen = stored
        else:
            chosen = _as_preset(preset)
            if stored is not None and stored.model != chosen.model:
                raise ValueError(f"preset={chosen.name!r} does not match the config stored in {p.name} "
                                 f"({stored.name!r}); pass preset=None to use the stored one")
    else:
        state = read_torch_state(p)
        if preset is None:
            raise ValueError(f"preset=None: {p.name} is a torch checkpoint (as guided-diffusion releases them), "
                             f"which does not record its config; pass one of {sorted(PRESETS)}")
        chosen = _as_preset(preset)
    with torch.device("meta"):
        model = build_model(chosen.model)
    assign_state_dict(model, state, source=p.name, preset_name=chosen.name)
    return _finish(model, chosen, device, dtype)


def assign_state_dict(model: nn.Module, state: dict, *, source: str = "state dict",
                      preset_name: str = "?") -> None:
    """Check keys and shapes, then assign the tensors (in the model's parameter dtypes)."""
    check_state_dict(model, state, source=source, preset_name=preset_name)
    expected = model.state_dict()
    cast = {k: (state[k] if state[k].dtype == v.dtype else state[k].to(v.dtype)) for k, v in expected.items()}
    model.load_state_dict(cast, strict=True, assign=True)


def check_state_dict(model: nn.Module, state: dict, *, source: str = "state dict", preset_name: str = "?") -> None:
    """Raise ValueError naming the first missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
        if wrong:
            shown = ", ".join(f"{k}: file {a} vs model {b}" for k, a, b in wrong[:5])
            parts.append(f"{len(wrong)} shape mismatches (first: {shown})")
        raise ValueError(f"{source} does not fit preset {preset_name!r}: " + "; ".join(parts))


def checkpoint_format(path: Path) -> str:
    """"safetensors", "torch-zip" (torch.save since 1.6), "torch-legacy" (older torch.save) or
    "unknown", from the file's first bytes (not its name)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):  # a pickle protocol 2-5 stream
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    return "unknown"


def read_torch_state(path: Path) -> dict:
    """A torch .pt/.pth state dict of tensors, read with weights_only=True (a pickle's code is never
    run); ValueError with one line naming the file otherwise."""
    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt == "unknown":
        raise ValueError(f"path={str(path)!r}: not a checkpoint (neither a torch .pt file nor .safetensors)")
    try:
        # mmap needs the zip format; a legacy file is read into memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=fmt == "torch-zip")
    except Exception as exc:  # zip/pickle errors of a truncated or foreign file
        if "weights only load failed" in str(exc).lower():
            # torch's own text advises weights_only=False, i.e. running the file's code: not repeated here
            raise ValueError(f"path={str(path)!r}: not a weights file admrt loads safely: it holds Python objects "
                             "other than tensors (code a pickle would run; admrt never runs it)") from None
        raise ValueError(f"path={str(path)!r}: cannot read the torch checkpoint (truncated, or not a state dict "
                         f"of tensors?): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"path={str(path)!r}: expected a state dict of tensors")
    return state


def read_safetensors_state(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors file; ValueError with one line naming the file when it
    is not one (truncated, damaged, another format)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        text = " ".join(str(exc).split())
        raise ValueError(f"path={str(path)!r}: cannot read the safetensors file (truncated or "
                         f"corrupted?): {text}") from None
    return state, meta


def _read_safetensors(path: Path) -> tuple[dict, Preset | None]:
    state, meta = read_safetensors_state(path)
    return state, _preset_of(meta)


def stored_preset(path) -> Preset | None:
    """The preset an admrt .safetensors file records (None: it records none); tensors unread."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return _preset_of(f.metadata() or {})


def _preset_of(meta: dict) -> Preset | None:
    return Preset.from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def save_model(model: nn.Module, path, *, preset: Preset | None = None, extra_metadata: dict | None = None) -> Path:
    """Write the weights (fp32) and the preset JSON to a .safetensors file, atomically."""
    from safetensors.torch import save_file

    preset = preset or getattr(model, "preset", None)
    if preset is None:
        raise ValueError("preset=None: the model has no .preset; pass preset=...")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path={str(path)!r}: expected a .safetensors file name")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {METADATA_KEY: preset.to_json(), "format": "admrt"}
    for k, v in (extra_metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
