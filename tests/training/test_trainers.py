"""The training loop: learning, resume, gradient accumulation, checkpoints, precision."""
from __future__ import annotations

import json

import pytest
import torch

import admrt
from admrt.training import TrainConfig, Trainer, evaluate, latest_checkpoint

TASKS = ["diffusion", "classifier", "upsampler"]


def _trainer(make_preset, data, task, out_dir=None, *, dropout=0.0, **cfg):
    torch.manual_seed(0)
    model = admrt.create_model(make_preset(task, dropout=dropout))
    defaults = dict(steps=6, batch_size=8, lr=2e-3, ema_rates=(0.9,), random_crop=task == "classifier")
    defaults.update(cfg)
    return Trainer(model, data, TrainConfig(task, **defaults), out_dir=out_dir, device="cpu")


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v.detach().clone() for k, v in tr.model.state_dict().items()}
    for rate, m in tr.ema.models.items():
        out.update({f"ema{rate}/{k}": v.detach().clone() for k, v in m.state_dict().items()})
    for i, st in tr.opt.state_dict()["state"].items():
        out.update({f"opt/{i}/{k}": v.clone() for k, v in st.items()})
    return out


@pytest.mark.parametrize("task", TASKS)
def test_loss_decreases_on_a_fixed_batch(make_preset, tiny_data, task):
    tr = _trainer(make_preset, tiny_data, task, steps=25, batch_size=16, ema_rates=())
    before = evaluate(tr.model, tiny_data, tr.config, seed=5)["loss"]
    tr.train()
    after = evaluate(tr.model, tiny_data, tr.config, seed=5)["loss"]
    assert after < 0.7 * before, (before, after)


def test_resume_reproduces_an_uninterrupted_run(make_preset, tiny_data, tmp_path):
    # dropout > 0 (RNG state) and the importance sampler (its history) are part of the state.
    kw = dict(dropout=0.1, steps=20, schedule_sampler="loss-second-moment", ema_rates=(0.9, 0.5))
    full = _trainer(make_preset, tiny_data, "diffusion", **kw)
    full.train()
    assert full.sampler.warmed_up()  # T = 10, history 10: warm after >= 100 samples

    first = _trainer(make_preset, tiny_data, "diffusion", out_dir=tmp_path, **kw)
    first.train(15)
    torch.manual_seed(123)  # the restored RNG state must win over whatever came after
    second = _trainer(make_preset, tiny_data, "diffusion", **kw)
    assert second.resume(tmp_path) == 15
    second.train()
    a, b = _state(full), _state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(full.sampler.loss_history, second.sampler.loss_history, rtol=0, atol=0)


def perturbed_trainer(make_preset, data, task, **cfg):
    """A trainer whose zero-initialised layers are perturbed, so every parameter gets a gradient."""
    tr = _trainer(make_preset, data, task, **cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return tr


def grads_of(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("task", ["upsampler", "classifier"])
def test_gradient_accumulation_averages_microbatches(make_preset, tiny_data, task):
    # Compare gradients of one step: Adam's g / sqrt(v) would blow rounding differences up.
    one = perturbed_trainer(make_preset, tiny_data, task, steps=1)
    acc = perturbed_trainer(make_preset, tiny_data, task, steps=1, microbatch=2)
    m1, m2 = one.train(), acc.train()
    torch.testing.assert_close(m1["loss"], m2["loss"], rtol=1e-5, atol=1e-6)
    g1, g2 = grads_of(one.model), grads_of(acc.model)
    assert all(g.abs().max() > 0 for g in g1.values())
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)


def test_checkpoint_files_and_round_trip(make_preset, tiny_data, tmp_path):
    tr = _trainer(make_preset, tiny_data, "classifier", out_dir=tmp_path, steps=3, ema_rates=(0.99,))
    tr.train()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ema_0.99_000003.safetensors", "model_000003.safetensors", "state_000003.safetensors"]
    assert latest_checkpoint(tmp_path).name == "state_000003.safetensors"
    # our weight format: loadable by admrt.load_model, config in the metadata
    loaded = admrt.load_model(tmp_path / "model_000003.safetensors")
    assert loaded.preset.model == tr.preset.model
    for k, v in tr.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    ema = admrt.load_model(tmp_path / "ema_0.99_000003.safetensors")
    for k, v in tr.ema.models[0.99].state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)
    # the state file holds tensors and JSON only (no pickles)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "state_000003.safetensors"), "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["step"]) == 3
        assert json.loads(meta["train_config"])["task"] == "classifier"
        assert any(k.startswith("optim/") for k in f.keys()) and "rng/cpu/0" in f.keys()
    again = _trainer(make_preset, tiny_data, "classifier", steps=3, ema_rates=(0.99,))
    again.resume(tmp_path / "state_000003.safetensors")
    a, b = _state(tr), _state(again)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="task"):
        _trainer(make_preset, tiny_data, "diffusion").resume(tmp_path)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_low_precision_steps(make_preset, tiny_data, dtype):
    tr = _trainer(make_preset, tiny_data, "diffusion", steps=2, dtype=dtype)
    m = tr.train()
    assert torch.isfinite(torch.as_tensor(m["loss"]))
    if dtype == "fp16":
        assert m["loss_scale"] > 0 and tr.scaler.is_enabled()
    else:
        assert not tr.scaler.is_enabled()


def test_config_and_task_errors(make_preset, tiny_data):
    with pytest.raises(ValueError, match="task="):
        TrainConfig("gan", steps=1)
    with pytest.raises(ValueError, match="dtype="):
        TrainConfig("diffusion", steps=1, dtype="fp8")
    with pytest.raises(ValueError, match="microbatch"):
        _trainer(make_preset, tiny_data, "diffusion", microbatch=3)
    model = admrt.create_model(make_preset("classifier"))
    with pytest.raises(ValueError, match="classifier"):
        Trainer(model, tiny_data, TrainConfig("diffusion", steps=1), device="cpu")
