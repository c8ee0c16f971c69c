"""95 % confidence intervals for the step table: a percentile bootstrap over prompts.

The unit resampled is the prompt, not the sample: the seeds of one prompt (and the frames of one clip) are not
independent draws, so resampling them separately would understate the spread. One bootstrap resample draws P prompts
with replacement from the P evaluated ones; every observation of a prompt drawn c times gets weight c. Then
  mean metrics (trajectory error, step consistency, CLIP score, oracle adherence): the weighted mean,
  FID: the Fréchet distance of the weighted features' Gaussian (against fixed reference statistics, or paired
       against the teacher's samples of the same resampled prompts for FID-teacher).
The interval is the (2.5 %, 97.5 %) quantile pair of the B resampled statistics (Efron's percentile interval); for
FID that pair is first shifted by the bootstrap's bias estimate, mean(FID*) - FID, and clipped at 0. Why: FID is biased
upward at small N, and a resample (about 63 % distinct prompts) is a smaller set, so FID* sits well above FID (on the
demo's 128-d features at N = 200 the whole unshifted interval lay above the point value). The shifted interval keeps the
bootstrap's spread around our value: it says how far FID at this N moves with another prompt set of the same size, and
does not remove FID's own small-N bias (compare FIDs only at equal N).
Draws come from numpy's PCG64 seeded by the caller, so one seed gives the same prompt draws to every row and metric.
With fewer than 2 prompts there is nothing to resample: the interval is (nan, nan), not a zero-width one.
"""

from dataclasses import dataclass

import numpy as np

from pcm.eval.fid import psd_sqrt, trace_sqrt_with_root

LEVEL = 0.95  # the coverage the report states


@dataclass(frozen=True)
class Interval:
    """A bootstrap interval: low, high (nan when it cannot be computed) over `clusters` prompts."""

    low: float
    high: float
    clusters: int


def cluster_labels(observations: int, clusters: int) -> np.ndarray:
    """(observations,) prompt index of each observation, for prompt-major data with equal counts per prompt
    (samples ordered (prompt, seed); frames ordered (prompt, seed, frame))."""
    if clusters < 1 or observations % clusters:
        raise ValueError(f"{observations} observations do not split evenly over {clusters} prompts")
    return np.repeat(np.arange(clusters), observations // clusters)


def resample_counts(clusters: int, resamples: int, seed: int) -> np.ndarray:
    """(B, P) how often each of P prompts is drawn in each of B resamples (each row sums to P)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(clusters, np.full(clusters, 1.0 / clusters), size=resamples).astype(np.float64)


def percentile_interval(statistics: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """(low, high): the (1 - level)/2 and (1 + level)/2 quantiles of the resampled statistics (linear interpolation,
    numpy's default)."""
    low, high = np.quantile(np.asarray(statistics, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def centred_interval(statistics: np.ndarray, point: float, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval shifted by the bootstrap bias estimate mean(statistics) - point, clipped at 0 (a
    distance): the resamples' spread placed around the point value."""
    shift = float(np.mean(statistics)) - point
    low, high = percentile_interval(statistics, level)
    return max(low - shift, 0.0), max(high - shift, 0.0)


def _nothing_to_resample(clusters: int, resamples: int) -> Interval | None:
    return Interval(float("nan"), float("nan"), clusters) if clusters < 2 or resamples < 1 else None


def bootstrap_mean(values: np.ndarray, groups: np.ndarray, resamples: int, seed: int,
                   level: float = LEVEL) -> Interval:
    """Percentile interval of the mean of values (n,), resampling the clusters groups (n,) ints in [0, P)."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    clusters = int(groups.max()) + 1 if groups.size else 0
    if (empty := _nothing_to_resample(clusters, resamples)) is not None:
        return empty
    counts = resample_counts(clusters, resamples, seed)  # (B, P)
    sums = np.bincount(groups, weights=values, minlength=clusters)  # per-prompt totals and sizes: the weighted mean
    sizes = np.bincount(groups, minlength=clusters).astype(np.float64)  # of a resample is counts@sums / counts@sizes
    return Interval(*percentile_interval(counts @ sums / (counts @ sizes), level), clusters)


def weighted_mean_cov(features: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), unbiased covariance (D, D)) of features (n, D) where row i occurs weights[i] times (integer counts:
    the same numbers as stacking the repeated rows and calling FeatureStats)."""
    count = weights.sum()
    mu = weights @ features / count
    outer = features.T @ (features * weights[:, None])
    return mu, (outer - count * np.outer(mu, mu)) / (count - 1)


def _fd(mu: np.ndarray, cov: np.ndarray, other_mu: np.ndarray, other_cov: np.ndarray, other_root) -> float:
    """FID with the other set's covariance root precomputed when it is fixed (one eigh per resample, not two)."""
    diff = mu - other_mu
    root = other_root if other_root is not None else psd_sqrt(other_cov)
    value = diff @ diff + np.trace(cov) + np.trace(other_cov) - 2 * trace_sqrt_with_root(root, cov)
    return float(max(value, 0.0))


class GramFID:
    """FID of features X (N, D), weighted (row i counted w_i times), against a fixed set (mu_o, S_o) or paired features
    Y (N, D) with the same weights, for fewer samples than dimensions (2048-d Inception at small N), through N x N
    matrices computed once: no D x D decomposition, and no D x D product per resample.

    With the weighted mean mu and A = rows sqrt(w_i / (c - 1)) (x_i - mu) (c = sum w), S = A^T A. For a fixed S_o,
    tr((S S_o)^(1/2)) is the sum of square roots of the eigenvalues of A S_o A^T; for a paired S_o = B^T B, the sum of
    the singular values of A B^T. Each entry (x_i - mu)^T M (y_j - mu') expands into the Gram matrix X M Y^T and its
    products with w, so a resample costs N^2 plus one decomposition of the drawn rows' n x n matrix. Both sets are first
    shifted by X's plain mean (FID does not change; the Gram entries stay free of a large common offset)."""

    def __init__(self, features: np.ndarray, other):
        x = np.asarray(features, dtype=np.float64)
        shift = x.mean(axis=0)
        x = x - shift
        self.paired = not isinstance(other, tuple)
        self.xx = x @ x.T
        if self.paired:
            y = np.asarray(other, dtype=np.float64) - shift
            self.cross, self.yy = x @ y.T, y @ y.T  # X Y^T, Y Y^T
        else:
            mu_o, sigma_o = (np.asarray(v, dtype=np.float64) for v in other[:2])
            mu_o = mu_o - shift
            self.cross = x @ sigma_o @ x.T  # X S_o X^T
            self.x_mu_o, self.mu_o_sq, self.trace_o = x @ mu_o, mu_o @ mu_o, np.trace(sigma_o)

    @staticmethod
    def _centred(gram: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
        """(x_i - mu_x)^T M (y_j - mu_y) for all i, j from gram = X M Y^T, both means weighted by w."""
        rows, cols = gram @ w / c, w @ gram / c
        return gram - rows[:, None] - cols[None, :] + (w @ gram @ w) / c ** 2

    def __call__(self, weights: np.ndarray) -> float:
        w = np.asarray(weights, dtype=np.float64)
        c, drawn = w.sum(), w > 0
        scale = np.sqrt(w[drawn] / (c - 1))
        xx = self._centred(self.xx, w, c)
        trace = (w @ np.diag(xx)) / (c - 1)  # tr(S) = sum(A * A)
        between = scale[:, None] * self._centred(self.cross, w, c)[np.ix_(drawn, drawn)] * scale[None, :]
        mu_sq = w @ self.xx @ w / c ** 2  # |mu|^2 (after the shift)
        if self.paired:
            trace_sqrt = np.linalg.svd(between, compute_uv=False).sum()
            other_trace = (w @ np.diag(self._centred(self.yy, w, c))) / (c - 1)
            diff_sq = mu_sq - 2 * (w @ self.cross @ w) / c ** 2 + w @ self.yy @ w / c ** 2
        else:
            trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((between + between.T) / 2), 0, None)).sum()
            other_trace = self.trace_o
            diff_sq = mu_sq - 2 * (w @ self.x_mu_o) / c + self.mu_o_sq
        return float(max(diff_sq + trace + other_trace - 2 * trace_sqrt, 0.0))


def sampled_fid(features: np.ndarray, other) -> float | None:
    """FID of features (n, D) against other, (mu, sigma) of a fixed set or features (n, D) of a paired one, through the
    n x n Gram matrices when n < D; None when n >= D (then pcm.eval.fid's running statistics are as cheap). At
    Inception's 2048-d and N = 200 this skips two 2048 x 2048 eigendecompositions per FID (~1 s each on 2 cores)."""
    features = np.asarray(features)
    if features.shape[0] >= features.shape[1]:
        return None
    return GramFID(features, other)(np.ones(len(features)))


def bootstrap_fid(features: np.ndarray, groups: np.ndarray, other, resamples: int, seed: int,
                  level: float = LEVEL) -> Interval:
    """Bias-shifted percentile interval of FID(features (n, D), other), resampling the prompts groups (n,).
    other: (mu, sigma) of a fixed set (the reference images), or features (n, D) with the same groups (the teacher's
    samples of the same prompts and seeds), resampled with the same draws (FID-teacher's prompt set is resampled on
    both sides, so identical sets stay at 0)."""
    features, groups = np.asarray(features, dtype=np.float64), np.asarray(groups)
    clusters = int(groups.max()) + 1 if groups.size else 0
    if (empty := _nothing_to_resample(clusters, resamples)) is not None:
        return empty
    paired = not isinstance(other, tuple)
    if paired:
        other = np.asarray(other, dtype=np.float64)
        if other.shape != features.shape:
            raise ValueError(f"paired FID needs features of the same shape: {features.shape} vs {other.shape}")
    fixed = None if paired else tuple(np.asarray(x, dtype=np.float64) for x in other[:2])
    gram = features.shape[0] < features.shape[1]  # fewer samples than dimensions: n x n algebra is cheaper
    fixed_root = None if paired or gram else psd_sqrt(fixed[1])
    by_gram = GramFID(features, other if paired else fixed) if gram else None

    def statistic(weights: np.ndarray) -> float:
        if by_gram is not None:
            return by_gram(weights)
        theirs = weighted_mean_cov(other, weights) if paired else fixed
        return _fd(*weighted_mean_cov(features, weights), *theirs, fixed_root)

    draws = resample_counts(clusters, resamples, seed)
    statistics = np.array([statistic(counts[groups]) for counts in draws])
    return Interval(*centred_interval(statistics, statistic(np.ones(len(groups))), level), clusters)
