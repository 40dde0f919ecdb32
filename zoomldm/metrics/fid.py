"""Fréchet distance between Gaussian feature statistics (FID and its variants).

DESIGN.md §7 / EDM2 convention: statistics are computed once per (dataset, magnification, extractor) and
cached as ``.npz``; a score is a pure function of two ``FeatureStats``. The feature extractor itself lives in
``zoomldm.metrics.extractors``; this module never touches images.

    FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})   (Heusel et al. 2017)

How the trace term is computed (sqrtm-free): S1 S2 is similar to the symmetric PSD matrix
M = S1^{1/2} S2 S1^{1/2} (conjugate by S1^{1/2}), so tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)). We take
S1^{1/2} from a symmetric eigendecomposition (negative round-off eigenvalues clipped to 0), form M, symmetrise
it, and sum the square roots of its clipped eigenvalues. Unlike ``scipy.linalg.sqrtm(S1 @ S2)`` this needs no
eps-offset fallback for singular covariances (n <= D), never produces an imaginary part, and agrees with the
sqrtm route to <= 1e-6 relative where that route is well conditioned (tests/test_metrics_fid.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["StatsError", "FeatureStats", "frechet_distance", "stats_from_features", "fid_from_stats"]


class StatsError(ValueError):
    """Statistics that cannot be compared (NaN, too few samples, mismatched dimension or extractor)."""


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (numerically) PSD matrix via eigh; negative round-off eigenvalues -> 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_stats(mu: np.ndarray, sigma: np.ndarray, which: str) -> None:
    if mu.ndim != 1:
        raise StatsError(f"{which}: mu must be 1-D, got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsError(f"{which}: sigma shape {sigma.shape} does not match mu dimension {mu.shape[0]}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsError(f"{which}: mu/sigma contain NaN or inf")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); float64, clipped at 0 (round-off only)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    _check_stats(mu1, sigma1, "first statistics")
    _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise StatsError(f"feature dimension mismatch: {mu1.shape[0]} vs {mu2.shape[0]}")

    s1_half = _sqrt_psd(sigma1)
    m = s1_half @ sigma2 @ s1_half  # similar to sigma1 @ sigma2, but symmetric PSD
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()

    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # FD >= 0 exactly; a tiny negative value is round-off


@dataclass
class FeatureStats:
    """Gaussian statistics of one image set under one extractor (mean, unbiased covariance, count)."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    n: int
    extractor: str

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file handle keeps numpy from appending ".npz" to other suffixes
            np.savez(f, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), extractor=np.str_(self.extractor))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature statistics file not found: {path}")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mu", "sigma", "n", "extractor") if k not in z.files]
            if missing:
                raise StatsError(f"{path}: missing key(s) {missing} (expected mu, sigma, n, extractor)")
            stats = cls(mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64),
                        n=int(z["n"]), extractor=str(z["extractor"]))
        _check_stats(stats.mu, stats.sigma, str(path))
        return stats


def stats_from_features(feats, extractor: str = "unknown") -> FeatureStats:
    """Mean and unbiased (N-1) covariance of features (N, D), as pytorch-fid / clean-fid compute them."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise StatsError(f"features must be 2-D (N, D), got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise StatsError(f"need at least 2 feature vectors for a covariance, got n={feats.shape[0]}")
    if not np.isfinite(feats).all():
        raise StatsError(f"features contain NaN or inf ({int((~np.isfinite(feats)).sum())} entries)")
    if feats.shape[0] <= feats.shape[1]:
        log.warning("n=%d <= D=%d: covariance is singular; FID is biased at this sample size",
                    feats.shape[0], feats.shape[1])
    mu = feats.mean(axis=0)
    sigma = np.cov(feats, rowvar=False)
    return FeatureStats(mu=mu, sigma=np.atleast_2d(sigma), n=int(feats.shape[0]), extractor=extractor)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two cached statistics; refuses to compare statistics from different extractors."""
    if a.extractor != b.extractor:
        raise StatsError(f"statistics come from different extractors: {a.extractor!r} vs {b.extractor!r}")
    for which, s in (("first", a), ("second", b)):
        if s.n < 2:
            raise StatsError(f"{which} statistics ({s.extractor}) were computed from n={s.n} < 2 samples")
    if a.dim != b.dim:
        raise StatsError(f"feature dimension mismatch: {a.dim} ({a.extractor}) vs {b.dim} ({b.extractor})")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
