"""The evaluator: feature network + metrics + a cache of reference statistics.

    ev = Evaluator(load_feature_network("fashion"))
    result = ev.evaluate("ref.npz", "samples.npz")    # or uint8 NHWC arrays
    print(result.fid, result.precision, result.recall)

As guided-diffusion's evaluations/evaluator.py main(): IS on the samples' logits; FID on pool
features; sFID on spatial features; precision/recall (k=3) between the pool features of the
reference and of the samples (optionally of a fixed random subset of the reference of
`pr_reference_size` images, e.g. as many as there are samples: the k-NN radii of a set shrink
as it grows, so very unequal sizes skew precision down and recall up). A reference batch that carries `mu`, `sigma`, `mu_s`, `sigma_s`
supplies its FID/sFID statistics (as the reference's read_statistics); its images are still
needed for precision/recall.

Reference statistics (pool and spatial Gaussians, pool features, k-NN radii) are computed once
per (image content, feature network, k) and cached as .npz under `cache_dir` (default eval/ under
admrt's cache root: $ADMRT_CACHE_DIR, else $XDG_CACHE_HOME/admrt, else ~/.cache/admrt), written
atomically.
"""
from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import npz
from .features import Activations, FeatureNetwork
from .metrics import FIDStatistics, frechet_distance, inception_score, manifold_radii, precision_recall

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """eval/ under admrt's one cache root (admrt.io.cache_root: $ADMRT_CACHE_DIR, else
    $XDG_CACHE_HOME/admrt, else ~/.cache/admrt)."""
    from admrt.io import cache_root
    return cache_root() / "eval"


@dataclass(frozen=True)
class ReferenceStatistics:
    """What the metrics need of a reference set."""

    pool: FIDStatistics          # FID
    spatial: FIDStatistics       # sFID
    features: np.ndarray         # (N, D) float32 pool features, for precision/recall
    radii: np.ndarray            # (N,) k-NN squared radii of `features`
    k: int

    def __len__(self) -> int:
        return len(self.features)


@dataclass(frozen=True)
class EvalResult:
    inception_score: float
    fid: float
    sfid: float
    precision: float
    recall: float
    num_samples: int
    num_reference: int
    feature_network: str

    def to_dict(self) -> dict:
        return asdict(self)


Source = "str | os.PathLike | np.ndarray"


class Evaluator:
    """Metrics of sample sets against reference sets with one feature network."""

    def __init__(self, network: FeatureNetwork, batch_size: int = 64, device: str = "cpu",
                 cache_dir: str | os.PathLike | None = None, use_cache: bool = True, k: int = 3,
                 is_splits: int = 10, fid_method: str = "eigh", pr_reference_size: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        if k < 1:
            raise ValueError(f"k={k}: expected >= 1")
        self.network = network
        self.batch_size = batch_size
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.use_cache = use_cache
        self.k = k
        self.is_splits = is_splits
        self.fid_method = fid_method
        if pr_reference_size is not None and pr_reference_size <= k:
            raise ValueError(f"pr_reference_size={pr_reference_size}: expected None (all) or > k={k}")
        self.pr_reference_size = pr_reference_size

    # -- features --------------------------------------------------------------------------
    def _batches(self, source):
        if isinstance(source, np.ndarray):
            npz._check_images(source, "images")
            return (source[i:i + self.batch_size] for i in range(0, len(source), self.batch_size))
        shape, dtype = npz.array_info(source)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
            raise ValueError(f"{source}: arr_0 must be uint8 (N, H, W, 1|3), got {dtype} {shape}")
        return npz.iter_batches(source, self.batch_size)

    def activations(self, source) -> Activations:
        """Features of a path to an .npz batch or of a uint8 NHWC array."""
        return self.network.activations(self._batches(source), device=self.device)

    # -- reference statistics (cached) -----------------------------------------------------
    def cache_path(self, content_hash: str) -> Path:
        fp = self.network.fingerprint or "unfingerprinted"
        return self.cache_dir / f"{self.network.name}-{fp[:16]}-{content_hash[:32]}-k{self.k}.npz"

    def reference(self, source) -> ReferenceStatistics:
        """Statistics of a reference set (path or array), from the cache when present."""
        given = None if isinstance(source, np.ndarray) else npz.load_statistics(source)
        path = None
        if self.use_cache and self.network.fingerprint:
            key = npz.content_hash(source)
            if given is not None:  # the file's own statistics are part of what is cached
                h = hashlib.sha256(key.encode())
                for st in given:
                    h.update(st.mu.tobytes())
                    h.update(st.sigma.tobytes())
                key = h.hexdigest()
            path = self.cache_path(key)
            cached = self._read_cache(path)
            if cached is not None:
                return cached
        acts = self.activations(source)
        pool, spatial = FIDStatistics.from_features(acts.pool), FIDStatistics.from_features(acts.spatial)
        if given is not None:
            if given[0].mu.shape != pool.mu.shape or given[1].mu.shape != spatial.mu.shape:
                raise ValueError(
                    f"{source}: its precomputed statistics have dimensions {given[0].mu.shape[0]} / "
                    f"{given[1].mu.shape[0]}, the feature network {self.network.name!r} gives "
                    f"{pool.mu.shape[0]} / {spatial.mu.shape[0]}; they come from another network")
            pool, spatial = given
        ref = ReferenceStatistics(pool, spatial, acts.pool.astype(np.float32),
                                  manifold_radii(acts.pool, self.k, device=self.device), self.k)
        if path is not None:
            npz.atomic_savez(path, version=np.int64(CACHE_VERSION), k=np.int64(self.k),
                             mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma,
                             features=ref.features, radii=ref.radii)
            log.info("cached reference statistics in %s", path)
        return ref

    def _read_cache(self, path: Path) -> ReferenceStatistics | None:
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                if int(z["version"]) != CACHE_VERSION or int(z["k"]) != self.k:
                    return None
                return ReferenceStatistics(FIDStatistics(z["mu"], z["sigma"]),
                                           FIDStatistics(z["mu_s"], z["sigma_s"]),
                                           z["features"], z["radii"], self.k)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:  # damaged: recompute
            log.warning("ignoring unreadable cache file %s (%s); recomputing", path, e)
            return None

    # -- metrics ---------------------------------------------------------------------------
    def evaluate_activations(self, ref: ReferenceStatistics, sample: Activations) -> EvalResult:
        """All metrics of sample features against reference statistics."""
        pool = FIDStatistics.from_features(sample.pool)
        spatial = FIDStatistics.from_features(sample.spatial)
        ref_features, ref_radii = ref.features, ref.radii
        if self.pr_reference_size is not None and self.pr_reference_size < len(ref):
            # A fixed random subset (seed 0) of the reference, with radii within the subset.
            idx = np.sort(np.random.default_rng(0).choice(len(ref), self.pr_reference_size, replace=False))
            ref_features, ref_radii = ref_features[idx], None
        precision, recall = precision_recall(ref_features, sample.pool, k=ref.k, device=self.device,
                                             ref_radii=ref_radii)
        return EvalResult(
            inception_score=inception_score(sample.logits, min(self.is_splits, len(sample))),
            fid=frechet_distance(pool, ref.pool, method=self.fid_method),
            sfid=frechet_distance(spatial, ref.spatial, method=self.fid_method),
            precision=precision, recall=recall,
            num_samples=len(sample), num_reference=len(ref), feature_network=self.network.name)

    def evaluate(self, reference, sample) -> EvalResult:
        """reference, sample: paths to .npz batches or uint8 NHWC arrays."""
        if not isinstance(reference, ReferenceStatistics):
            ref_shape, sample_shape = self.image_shape(reference), self.image_shape(sample)
            if ref_shape != sample_shape:
                raise ValueError(
                    "the reference images are {}x{}x{} (HxWxC) and the samples {}x{}x{}: compare batches of one "
                    "size and channel count (the feature network would resize and convert them silently, e.g. a "
                    "gray batch and its RGB copy give FID 0)".format(*ref_shape, *sample_shape))
        ref = reference if isinstance(reference, ReferenceStatistics) else self.reference(reference)
        return self.evaluate_activations(ref, self.activations(sample))

    @staticmethod
    def image_shape(source) -> tuple[int, int, int]:
        """(H, W, C) of a batch (path or uint8 NHWC array), from the .npz header for a path."""
        shape = source.shape if isinstance(source, np.ndarray) else npz.array_info(source)[0]
        if len(shape) != 4:
            raise ValueError(f"{'images' if isinstance(source, np.ndarray) else source}: expected uint8 "
                             f"(N, H, W, 1|3) images, got shape {tuple(shape)}")
        return tuple(int(d) for d in shape[1:])
