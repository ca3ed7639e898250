"""Feature networks: shapes, input handling, weight files (random weights; no downloads)."""
import numpy as np
import pytest
import torch

from admrt.evaluation.features import (BUNDLED_FASHION_FEATURES, FashionFeatureNet, InceptionV3FID,
                                       load_feature_network, tf1_resize_bilinear)


def test_tf1_legacy_resize_bilinear():
    # TF1 align_corners=False samples output i at input i * in/out (no half-pixel shift).
    x = torch.tensor([[[[0.0, 10.0]]]])
    assert tf1_resize_bilinear(x, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    y = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(tf1_resize_bilinear(y, (2, 2)).flatten(), torch.tensor([0.0, 2.0, 8.0, 10.0]))
    assert tf1_resize_bilinear(y, (4, 4)) is y


def test_fashion_net_shapes_any_size_and_channels():
    net = FashionFeatureNet().eval()
    with torch.no_grad():
        for shape in [(3, 16, 16, 1), (2, 28, 28, 1), (2, 32, 32, 3), (1, 64, 48, 1)]:
            pool, spatial, logits = net(torch.randint(0, 256, shape, dtype=torch.uint8))
            assert pool.shape == (shape[0], 128) and logits.shape == (shape[0], 10)
            assert spatial.shape == (shape[0], 7 * 8 * 8)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        net(torch.zeros(1, 8, 8, 2, dtype=torch.uint8))


def test_fashion_net_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = FashionFeatureNet().eval()
    for m in net.modules():                       # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    net.save(tmp_path / "f.safetensors", metadata={"note": "test"})
    back = load_feature_network("fashion", tmp_path / "f.safetensors")
    assert len(back.fingerprint) == 64 and back.metadata["note"] == "test"
    x = torch.randint(0, 256, (4, 16, 16, 1), dtype=torch.uint8)
    with torch.no_grad():
        for a, b in zip(net(x), back(x)):
            assert torch.equal(a, b)


def test_inception_forward_shapes_random_weights(one_thread):
    torch.manual_seed(0)
    net = InceptionV3FID().eval()
    assert len(net.state_dict()) == 566           # 94 conv+BN blocks x 6 tensors + fc.weight, fc.bias
    with torch.no_grad():
        pool, spatial, logits = net(torch.randint(0, 256, (1, 32, 32, 1), dtype=torch.uint8))
    assert pool.shape == (1, 2048) and spatial.shape == (1, 7 * 17 * 17) and logits.shape == (1, 1008)
    assert torch.all(pool >= 0) and torch.all(spatial >= 0)   # ReLU outputs


def test_inception_weight_file_layout(tmp_path):
    net = InceptionV3FID()
    state = net.state_dict()
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = InceptionV3FID.from_file(tmp_path / "pt_inception.pth")
    assert torch.equal(loaded.Mixed_7c.branch_pool.conv.weight, net.Mixed_7c.branch_pool.conv.weight)
    assert len(loaded.fingerprint) == 64
    bad = dict(state)
    bad["extra.weight"] = bad.pop("fc.bias")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="pt_inception-2015-12-05 layout"):
        InceptionV3FID.from_file(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        InceptionV3FID.from_file(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="needs weights"):
        load_feature_network("inception")


@pytest.mark.skipif(not BUNDLED_FASHION_FEATURES.exists(), reason="bundled feature network not built yet")
def test_bundled_fashion_net_separates_real_from_noise(one_thread):
    import json
    from admrt.evaluation.evaluator import Evaluator
    from admrt.evaluation.train_features import fashion_uint8
    net = load_feature_network("fashion")
    acc = json.loads(net.metadata["training"])["test_accuracy"]
    assert acc["32"] >= 0.85 and acc["16"] >= 0.85
    test = fashion_uint8("test", 16)[0][:1000]
    ev = Evaluator(net, use_cache=False, batch_size=500)
    real = ev.evaluate(test[:500], test[500:])
    noise = ev.evaluate(test[:500], np.random.default_rng(0).integers(0, 256, test[500:].shape, dtype=np.uint8))
    assert real.fid * 10 < noise.fid
    assert real.precision > 0.8 and real.recall > 0.8 and noise.recall < 0.05
    assert real.inception_score > 5 and noise.inception_score < 2
