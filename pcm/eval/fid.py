"""Fréchet distance between Gaussians fitted to feature sets, with streamed statistics (float64 throughout).

FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2)).

tr((S_1 S_2)^(1/2)) is computed without a matrix square root of a non-symmetric product: with R = S_1^(1/2) (the
symmetric PSD root from an eigen-decomposition), S_1 S_2 is similar to R S_2 R, which is symmetric PSD, so its
square root's trace is the sum of the square roots of R S_2 R's eigenvalues (negative round-off clipped to 0).
That avoids scipy.linalg.sqrtm's complex parts and its failures on singular covariances (fewer samples than
feature dimensions), which the usual implementations paper over with an epsilon on the diagonal.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric PSD matrix (D, D), eigenvalues clipped at 0."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_with_root(root_1: np.ndarray, sigma_2: np.ndarray) -> float:
    """tr((S_1 S_2)^(1/2)) given R = S_1^(1/2) (D, D): the bootstrap reuses the root of a fixed S_1."""
    middle = root_1 @ np.asarray(sigma_2, dtype=np.float64) @ root_1
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def trace_sqrt_product(sigma_1: np.ndarray, sigma_2: np.ndarray) -> float:
    """tr((S_1 S_2)^(1/2)) for symmetric PSD S_1, S_2 (D, D)."""
    return trace_sqrt_with_root(psd_sqrt(np.asarray(sigma_1, dtype=np.float64)), sigma_2)


def frechet_distance(mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray) -> float:
    """||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)): means (D,), covariances (D, D); float64."""
    mu_1, mu_2 = np.asarray(mu_1, dtype=np.float64), np.asarray(mu_2, dtype=np.float64)
    if mu_1.shape != mu_2.shape:
        raise ValueError(f"feature dimensions differ: {mu_1.shape} vs {mu_2.shape} (computed by different networks?)")
    diff = mu_1 - mu_2
    value = diff @ diff + np.trace(sigma_1) + np.trace(sigma_2) - 2 * trace_sqrt_product(sigma_1, sigma_2)
    return float(max(value, 0.0))  # round-off can leave -1e-12 for identical sets


@dataclass
class FeatureStats:
    """Running sums of feature vectors, so a set's mean and covariance never need all features in memory."""

    count: int = 0
    total: np.ndarray | None = None  # (D,) float64
    outer: np.ndarray | None = None  # (D, D) float64: sum of x x^T

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Adds features (B, D)."""
        x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (batch, dim), got shape {x.shape}")
        if self.total is None:
            self.total, self.outer = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        self.count += len(x)
        self.total += x.sum(axis=0)
        self.outer += x.T @ x

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), unbiased covariance (D, D))."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mu = self.total / self.count
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, cov

    def save(self, path: str | Path) -> None:
        mu, cov = self.mean_cov()
        save_file({"mu": mu, "sigma": cov, "count": np.array([self.count])}, str(path))


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) written by FeatureStats.save."""
    data = load_file(str(path))
    return data["mu"], data["sigma"], int(data["count"][0])


def fid(a: FeatureStats | tuple, b: FeatureStats | tuple) -> float:
    """FID between two feature sets, each FeatureStats or (mu, sigma[, count])."""
    (mu_a, s_a), (mu_b, s_b) = (x.mean_cov() if isinstance(x, FeatureStats) else x[:2] for x in (a, b))
    return frechet_distance(mu_a, s_a, mu_b, s_b)
