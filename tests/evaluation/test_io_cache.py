"""npz batches (reference format) and the reference-statistics cache."""
import os

import numpy as np
import pytest
import torch

from admrt.evaluation import npz
from admrt.evaluation.evaluator import Evaluator
from admrt.evaluation.features import FashionFeatureNet, FashionNetConfig
from admrt.evaluation.metrics import FIDStatistics


def _images(n, seed=0, size=8, c=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, c), dtype=np.uint8)


def test_npz_round_trip_and_streaming(tmp_path):
    images, labels = _images(23, c=3), np.arange(23) % 10
    stats = (FIDStatistics(np.arange(3.0), np.eye(3)), FIDStatistics(np.ones(2), 2 * np.eye(2)))
    path = npz.save_batch(tmp_path / "b.npz", images, labels, stats)
    assert [p.name for p in tmp_path.iterdir()] == ["b.npz"]           # no temporary file left
    with np.load(path) as z:                                            # the reference's keys
        assert set(z.files) == {"arr_0", "arr_1", "mu", "sigma", "mu_s", "sigma_s"}
        assert z["arr_0"].dtype == np.uint8 and np.array_equal(z["arr_1"], labels)
    chunks = list(npz.iter_batches(path, 5))
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]
    assert np.array_equal(np.concatenate(chunks), images)
    assert npz.array_info(path) == ((23, 8, 8, 3), np.dtype(np.uint8))
    pool, spatial = npz.load_statistics(path)
    assert np.array_equal(pool.mu, stats[0].mu) and np.array_equal(spatial.sigma, stats[1].sigma)
    assert npz.content_hash(path) == npz.content_hash(images) != npz.content_hash(images[:-1])


def test_npz_errors(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        npz.save_batch(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp_path / "y.npz", other=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0"):
        list(npz.iter_batches(tmp_path / "y.npz", 4))
    assert npz.load_statistics(npz.save_batch(tmp_path / "z.npz", _images(2))) is None


def _tiny_net():
    torch.manual_seed(0)
    net = FashionFeatureNet(FashionNetConfig(stages=((4,), (8,), (8,), (16,)), input_size=16)).eval()
    net.fingerprint = "f" * 64
    return net


def test_reference_statistics_are_cached(tmp_path):
    net = _tiny_net()
    ev = Evaluator(net, batch_size=16, cache_dir=tmp_path / "cache")
    ref_images = _images(40, seed=1)
    ref = ev.reference(ref_images)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz" and net.name in files[0].name
    # A second call reads the cache: the network must not run again.
    calls = []
    orig = net.activations
    net.activations = lambda *a, **k: calls.append(1) or orig(*a, **k)
    again = ev.reference(ref_images.copy())
    assert calls == []
    assert np.array_equal(again.pool.sigma, ref.pool.sigma) and np.array_equal(again.radii, ref.radii)
    # The same content from an .npz file hits the same entry.
    path = npz.save_batch(tmp_path / "ref.npz", ref_images)
    ev.reference(path)
    assert calls == [] and len(list((tmp_path / "cache").iterdir())) == 1
    # Other content, another feature network or another k: new entries.
    ev.reference(_images(40, seed=2))
    net.fingerprint = "e" * 64
    ev.reference(ref_images)
    Evaluator(net, cache_dir=tmp_path / "cache", k=5).reference(ref_images)
    assert len(calls) == 3 and len(list((tmp_path / "cache").iterdir())) == 4
    # use_cache=False neither reads nor writes.
    Evaluator(net, cache_dir=tmp_path / "nocache", use_cache=False).reference(ref_images)
    assert not (tmp_path / "nocache").exists()


def test_corrupt_cache_is_recomputed(tmp_path):
    net = _tiny_net()
    ev = Evaluator(net, cache_dir=tmp_path)
    imgs = _images(30)
    ev.reference(imgs)
    (f,) = tmp_path.iterdir()
    f.write_bytes(b"not an npz")
    ref = ev.reference(imgs)
    assert len(ref) == 30 and np.load(f)["features"].shape == ref.features.shape


def test_evaluate_identical_sets(tmp_path):
    ev = Evaluator(_tiny_net(), cache_dir=tmp_path)
    imgs = _images(60, seed=3)
    r = ev.evaluate(imgs, imgs)
    assert abs(r.fid) < 1e-6 and abs(r.sfid) < 1e-6
    assert r.precision == 1.0 and r.recall == 1.0 and r.num_samples == r.num_reference == 60
    other = ev.evaluate(imgs, np.full_like(imgs, 255))
    assert other.fid > 1e-3 and other.precision == 0.0


def test_precomputed_reference_statistics_are_used(tmp_path):
    net = _tiny_net()
    ev = Evaluator(net, cache_dir=tmp_path / "cache")
    imgs = _images(30)
    acts = ev.activations(imgs)
    d, ds = acts.pool.shape[1], acts.spatial.shape[1]
    given = (FIDStatistics(np.full(d, 7.0), np.eye(d)), FIDStatistics(np.zeros(ds), np.eye(ds)))
    path = npz.save_batch(tmp_path / "ref.npz", imgs, stats=given)
    assert np.array_equal(ev.reference(path).pool.mu, given[0].mu)
    assert np.array_equal(ev.reference(path).pool.mu, given[0].mu)           # cached with them
    # The same images without statistics are another cache entry, with their own statistics.
    assert np.allclose(ev.reference(imgs).pool.mu, acts.pool.astype(np.float64).mean(0))
    assert len(list((tmp_path / "cache").iterdir())) == 2
    bad = npz.save_batch(tmp_path / "bad.npz", imgs, stats=(FIDStatistics(np.zeros(2048), np.eye(2048)), given[1]))
    with pytest.raises(ValueError, match="another network"):
        ev.reference(bad)
