"""Checkpoint I/O and input checks: round trips, released-format loads, clear errors."""
import pytest
import torch

import admrt


def _randomised(name):
    torch.manual_seed(0)
    model = admrt.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def _forward(model, batch=2):
    c = model.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
    t = torch.tensor([10, 900][:batch])
    kw = {"y": torch.tensor([1, 2][:batch])} if c.num_classes else {}
    with torch.no_grad():
        return model(x, t, **kw)


def test_safetensors_round_trip_records_config(tmp_path):
    model = _randomised("tiny-cond")
    path = admrt.save_model(model, tmp_path / "m.safetensors")
    loaded = admrt.load_model(path)
    assert loaded.config == model.config and loaded.preset.name == "tiny-cond"
    assert torch.equal(_forward(loaded), _forward(model))
    assert not any(p.is_meta for p in loaded.parameters())


def test_released_pt_format_needs_and_uses_a_preset(tmp_path):
    model = _randomised("tiny-cond")
    path = tmp_path / "256x256_like.pt"
    torch.save(model.state_dict(), path)  # guided-diffusion's released files are plain state dicts
    with pytest.raises(ValueError, match="does not record its config"):
        admrt.load_model(path)
    loaded = admrt.load_model(path, preset="tiny-cond")
    assert torch.equal(_forward(loaded), _forward(model))


def test_wrong_preset_names_first_mismatched_keys(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(_randomised("tiny-cond").state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit preset 'tiny-uncond'.*(missing|unexpected|shape)"):
        admrt.load_model(path, preset="tiny-uncond")


def test_preset_disagreeing_with_stored_config_is_an_error(tmp_path):
    path = admrt.save_model(_randomised("tiny-cond"), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="does not match the config stored"):
        admrt.load_model(path, preset="tiny-uncond")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_a_clear_error(tmp_path, suffix):
    model = _randomised("tiny-cond")
    path = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        admrt.save_model(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read"):
        admrt.load_model(path, preset="tiny-cond")


def test_missing_file_and_unknown_preset():
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        admrt.load_model("/nonexistent/model.pt", preset="tiny-cond")
    with pytest.raises(ValueError, match="unknown preset"):
        admrt.create_model("imagenet1024-cond")


def test_bad_inputs_give_clear_errors():
    model = admrt.create_model("tiny-cond")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3, 32, 32\): expected \(B, 3, 16, 16\)"):
        model(torch.randn(2, 3, 32, 32), t, y=torch.tensor([0, 1]))
    with pytest.raises(IndexError):  # no host read of y inside forward; the embedding refuses it on the CPU
        model(x, t, y=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="y=None: this model is class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        admrt.create_model("tiny-uncond")(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="low_res.shape"):
        admrt.create_model("tiny-upsample")(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dtype='fp8'"):
        model.set_dtype("fp8")


def test_config_validation_names_argument():
    with pytest.raises(ValueError, match="pool=None"):
        admrt.ModelConfig(kind="classifier", image_size=16, model_channels=32, out_channels=10,
                          num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2))
    with pytest.raises(ValueError, match="image_size=18"):
        admrt.ModelConfig(kind="unet", image_size=18, model_channels=32, out_channels=6,
                          num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2, 2))


def test_weights_are_assigned_not_copied():
    from admrt.checkpoint import assign_state_dict
    from admrt.models import build_model

    state = {k: v.clone() for k, v in _randomised("tiny-cond").state_dict().items()}
    with torch.device("meta"):
        model = build_model(admrt.get_preset("tiny-cond").model)
    assign_state_dict(model, state)
    params = dict(model.named_parameters())
    assert all(params[k].data_ptr() == v.data_ptr() for k, v in state.items())
