"""Checkpoint I/O of a training run (in its out_dir, every file written atomically):
model_{step}.safetensors and ema_{rate}_{step}.safetensors (admrt.save_model: weights + preset
JSON), and state_{step}.safetensors (AdamW moments, loss scaler, timestep-sampler history, RNG
states; tensors only, scalars in the JSON metadata; no pickles). The state file is written last
and marks a complete checkpoint. The Trainer (training/loop.py) writes and reads them with these.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from admrt.config import Preset


STATE_RE = re.compile(r"^state_(\d+)\.safetensors$")


def step_of(state_path) -> int:
    """The step of a state_*.safetensors checkpoint, from its name."""
    return int(STATE_RE.match(Path(state_path).name).group(1))


def state_files(folder) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints (state_*.safetensors) in `folder`, by step."""
    p = Path(folder)
    if not p.is_dir():
        return []
    return sorted((int(m.group(1)), q) for q in p.iterdir() if (m := STATE_RE.match(q.name)))


def latest_checkpoint(path) -> Path:
    """The state file at `path`, or the one of the highest step in folder `path`."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"resume={str(path)!r}: no such checkpoint file or folder")
    found = state_files(p)
    if not found:
        raise FileNotFoundError(f"resume={str(path)!r}: no state_*.safetensors checkpoint in this folder")
    return found[-1][1]


STATE_FIELDS = ("step", "train_config", "optimizer", "scaler")  # the metadata a state file holds


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_state(path, *, tensors: bool = True) -> tuple[dict, dict]:
    """The parsed metadata (step, train_config, optimizer, scaler, ...) and the tensors of a
    state_*.safetensors checkpoint. A file that is not one (damaged, another format, a model's
    weights) raises ValueError in one line naming it; nothing in it is executed (safetensors)."""
    from safetensors import safe_open

    path = Path(path)
    expected = "expected a training-state file (state_*.safetensors of `admrt train`) or its run folder"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except OSError:
        raise
    except Exception as exc:  # safetensors' own errors (a damaged header, not safetensors at all)
        raise ValueError(f"{path}: not a readable .safetensors file ({_first_line(exc)}); {expected}") from None
    missing = [k for k in STATE_FIELDS if k not in meta]
    if missing:
        what = "a model's weights" if "step" in meta or "format" in meta else "another file"
        raise ValueError(f"{path}: {what}, not a training state (its metadata has no {missing[0]!r}); {expected}")
    parsed = dict(meta)
    for key in STATE_FIELDS:
        try:
            parsed[key] = int(meta[key]) if key == "step" else json.loads(meta[key])
            if key != "step" and not isinstance(parsed[key], dict):
                raise ValueError("not a JSON object")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: damaged training state (metadata {key!r}: {_first_line(exc)}); "
                             f"{expected}") from None
    if parsed["step"] < 0:
        raise ValueError(f"{path}: damaged training state (metadata 'step': {parsed['step']}); {expected}")
    return parsed, found


def load_weights(model: nn.Module, path: Path, preset_name: str = "?") -> None:
    """Copy a checkpoint's weights into `model` in place (the optimizer keeps its parameters),
    after the checkpoint loader's key and shape check."""
    from safetensors.torch import load_file

    from admrt.checkpoint import check_state_dict

    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        state = load_file(str(path))
    except OSError:
        raise
    except Exception as exc:  # safetensors' own errors: a damaged file
        raise ValueError(f"{path}: not a readable .safetensors file ({_first_line(exc)}); the checkpoint is "
                         "damaged") from None
    check_state_dict(model, state, source=path.name, preset_name=preset_name)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, strict=True)


def config_diff(a: Preset, b: Preset) -> str:
    """The first differing fields of two presets' model and diffusion configs."""
    from dataclasses import fields

    diffs = [f"{part}.{f.name}: {getattr(getattr(a, part), f.name)!r} -> {getattr(getattr(b, part), f.name)!r}"
             for part in ("model", "diffusion") for f in fields(getattr(a, part))
             if getattr(getattr(a, part), f.name) != getattr(getattr(b, part), f.name)]
    return "; ".join(diffs[:4]) + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{idx}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}/{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict, meta: dict, device) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim/"):
            _, idx, k = key.split("/", 2)
            state.setdefault(int(idx), {})[k] = v if k == "step" else v.to(device)
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_tensors(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    from admrt.io import atomic_write

    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                             metadata=metadata))
