"""The ADM evaluator's metrics on feature arrays: FID, sFID, Inception Score, improved
precision/recall.

Definitions follow openai/guided-diffusion evaluations/evaluator.py (the paper's evaluator):
- `FIDStatistics` / `frechet_distance`: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2),
  with S the unbiased covariance (`np.cov(rowvar=False)`). FID uses pool features, sFID the
  spatial features (the same formula).
- `inception_score`: exp(E_x KL(p(y|x) || p(y))), averaged over splits (the reference: splits of
  5000 of 50000 samples, i.e. 10 splits; here 10 splits of any N by default).
- `precision_recall`: Kynkaanniemi et al. 2019 as the reference's ManifoldEstimator with
  nhood_sizes=(3,): each point's radius is the SQUARED distance to its k-th nearest neighbour in
  its own set (itself excluded), a point is "in" the other set's manifold when its squared
  distance to some point there is <= that point's radius; precision = fraction of samples in
  the reference manifold, recall = fraction of reference points in the sample manifold.

Differences from the reference, all on the side of accuracy: the trace of the matrix square
root is taken from the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2 (no complex
parts, no failure on singular covariances; `method="sqrtm"` gives the reference's scipy path);
pairwise distances are computed in float32 (the reference tries float16 first); the log of the
class probabilities comes from log_softmax (no log(0)). Everything runs on numpy 2.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class FIDStatistics:
    """Gaussian fitted to features: mu (D,) and sigma (D, D), float64."""

    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        mu, sigma = np.atleast_1d(self.mu), np.atleast_2d(self.sigma)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"FIDStatistics: mu {mu.shape} and sigma {sigma.shape} must be (D,) and (D, D)")
        object.__setattr__(self, "mu", mu.astype(np.float64, copy=False))
        object.__setattr__(self, "sigma", sigma.astype(np.float64, copy=False))

    @classmethod
    def from_features(cls, features: np.ndarray) -> "FIDStatistics":
        """features (N, D) -> mean and unbiased covariance (the reference's compute_statistics)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"features: expected (N >= 2, D), got shape {x.shape}")
        return cls(x.mean(axis=0), np.cov(x, rowvar=False))

    def frechet_distance(self, other: "FIDStatistics", method: str = "eigh") -> float:
        return frechet_distance(self, other, method=method)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^1/2) for symmetric PSD S1, S2, via the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2 (similar to S1 S2, so same eigenvalues). Negative eigenvalues from
    rounding are clipped to 0."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(_clip_null(w))) @ v.T                 # S1^1/2
    m = root1 @ sigma2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_null(ev)).sum())


def _clip_null(ev: np.ndarray) -> np.ndarray:
    """Eigenvalues below the rank threshold (n * eps * max|ev|, as numpy's matrix_rank) are 0:
    a rank-deficient covariance (N <= D) then contributes no sqrt(rounding noise) terms."""
    tol = ev.size * np.finfo(np.float64).eps * max(float(np.abs(ev).max(initial=0.0)), 1e-300)
    return np.where(ev > tol, ev, 0.0)


def _trace_sqrt_product_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """The reference's path: scipy.linalg.sqrtm(S1 S2); on a non-finite result retry with
    eps * I added to both; reject imaginary parts above 1e-3 on the diagonal."""
    from scipy import linalg
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(a: FIDStatistics, b: FIDStatistics, method: str = "eigh") -> float:
    """Frechet distance between two Gaussians (FID / sFID). method: "eigh" (default, stable)
    or "sqrtm" (scipy, as the reference)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"statistics have different dimensions: {a.mu.shape[0]} and {b.mu.shape[0]} "
                         f"(made by different feature networks?)")
    if method == "eigh":
        tr_covmean = trace_sqrt_product(a.sigma, b.sigma)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_scipy(a.sigma, b.sigma)
    else:
        raise ValueError(f"method={method!r}: expected 'eigh' or 'sqrtm'")
    diff = a.mu - b.mu
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, num_splits: int = 10) -> float:
    """IS = mean over splits of exp(mean_x sum_y p(y|x) (log p(y|x) - log p_split(y))).

    logits (N, K): p(y|x) = softmax(logits). The N samples are cut into `num_splits`
    contiguous parts (np.array_split), as the reference's 10 splits of 5000 at N = 50000."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.dim() != 2 or z.shape[0] < num_splits or num_splits < 1:
        raise ValueError(f"logits: expected (N >= num_splits={num_splits}, K), got shape {tuple(z.shape)}")
    logp = torch.log_softmax(z, dim=1)
    scores = []
    for part in torch.tensor_split(logp, num_splits):
        p = part.exp()
        log_marginal = torch.logsumexp(part, dim=0) - np.log(part.shape[0])   # log mean_x p(y|x)
        kl = (p * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(A, D), (B, D) -> (A, B) squared Euclidean distances, clamped at 0 (as the reference)."""
    nu = (u * u).sum(1, keepdim=True)
    nv = (v * v).sum(1, keepdim=True).t()
    return (nu - 2.0 * (u @ v.t()) + nv).clamp_(min=0.0)


def _as_tensor(x: np.ndarray, device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x))
    if x.dim() != 2:
        raise ValueError(f"features: expected (N, D), got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float32)


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 4096, device="cpu") -> np.ndarray:
    """(N,) squared distance of each point to its k-th nearest neighbour in `features` (the
    point itself, at distance 0, is the 0-th), as ManifoldEstimator.manifold_radii. Works in
    (batch_size, batch_size) blocks, keeping the k+1 smallest distances of each row."""
    x = _as_tensor(features, device)
    if x.shape[0] <= k:
        raise ValueError(f"features: need more than k={k} points for k-NN radii, got {x.shape[0]}")
    radii = []
    for i in range(0, x.shape[0], batch_size):
        best = None                                                  # (rows, <= k+1) smallest so far
        for j in range(0, x.shape[0], batch_size):
            d = pairwise_sq_distances(x[i:i + batch_size], x[j:j + batch_size])
            d = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii).cpu().numpy()


def _fraction_in_manifold(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor,
                          batch_size: int) -> float:
    """Fraction of `points` within the squared radius of at least one `manifold` point."""
    inside = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
    for i in range(0, points.shape[0], batch_size):
        for j in range(0, manifold.shape[0], batch_size):
            d = pairwise_sq_distances(points[i:i + batch_size], manifold[j:j + batch_size])
            inside[i:i + batch_size] |= (d <= radii[None, j:j + batch_size]).any(1)
    return float(inside.double().mean())


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                     batch_size: int = 4096, device="cpu",
                     ref_radii: np.ndarray | None = None) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds, squared distances). `ref_radii` may be
    passed when cached (they depend on the reference features and k only)."""
    ref = _as_tensor(ref_features, device)
    sam = _as_tensor(sample_features, device)
    if ref.shape[1] != sam.shape[1]:
        raise ValueError(f"features: reference has D={ref.shape[1]}, samples D={sam.shape[1]}")
    r_ref = torch.as_tensor(manifold_radii(ref_features, k, batch_size, device) if ref_radii is None
                            else np.asarray(ref_radii), dtype=torch.float32, device=device)
    r_sam = torch.as_tensor(manifold_radii(sample_features, k, batch_size, device), dtype=torch.float32,
                            device=device)
    precision = _fraction_in_manifold(sam, ref, r_ref, batch_size)
    recall = _fraction_in_manifold(ref, sam, r_sam, batch_size)
    return precision, recall
