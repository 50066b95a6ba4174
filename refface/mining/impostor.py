"""Impostor-distance model of one embedding set: how many strangers each face has within a distance.

Every face of a photo pool has a handful of photos of its own person among its nearest neighbours
and then strangers. Past the first ``rank_start`` neighbours (more photos than one identity holds)
a face's neighbours are strangers, and how fast their count grows with distance is measured on
the set itself: for face ``i`` the expected number of strangers closer than ``d`` is modelled as

    lambda_i(d) = (d / scale_i) ** exponent

(a power law: the count of points in a ball grows with a power of its radius). ``exponent`` is
shared by the set (the median of per-face log-log slopes over the fitted ranks); ``scale_i`` is
per face, so a face in a crowded region of the embedding (many look-alikes of one gender, age and
ethnicity) gets a smaller same-identity radius than a face in an empty one. As the pool grows
every face's neighbours move closer, the scales shrink and with them the radii: the cut follows
the pool instead of being a constant tuned on one set.

:meth:`ImpostorModel.cut` turns the model into a pool-wide cut with a false-discovery bound: the
largest distance at which the strangers the model expects within it make up at most
``max_false_merge`` of the k-NN pairs actually found within it. Where identities hold many photos
the found pairs outnumber the expected strangers and the cut reaches further; in a pool of lone
faces it stays tight. :meth:`ImpostorModel.radii` spreads the cut over the faces by their local
scale. Everything comes from the k-NN graph, O(N k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The model is fitted on neighbour ranks [RANK_START, k]: ranks below hold the face's own identity.
RANK_START = 24
MIN_FIT_RANKS = 8


@dataclass(frozen=True)
class ImpostorModel:
    """Per-face stranger counts ``(d / scale) ** exponent`` fitted on one embedding set.

    Attributes:
        scale: (N,) distance at which face i expects one stranger (cosine distance).
        exponent: growth of the stranger count with distance (shared by the set).
        ranks: the neighbour ranks (first, last; 1-based) the model was fitted on.
    """

    scale: np.ndarray
    exponent: float
    ranks: tuple[int, int]

    def __len__(self) -> int:
        return int(self.scale.size)

    def expected(self, rows: np.ndarray, distance: np.ndarray) -> np.ndarray:
        """Expected strangers within ``distance`` of face ``rows`` (broadcast together)."""
        d = np.maximum(np.asarray(distance, dtype=np.float64), 0.0)
        return (d / self.scale[np.asarray(rows)]) ** self.exponent

    def radius(self, max_false_merge: float, density: float = 1.0) -> np.ndarray:
        """(N,) the distance within which each face expects ``max_false_merge`` strangers.

        ``density`` blends each face's own radius (1) with the set's median radius (0)
        geometrically: per-face scales are noisy estimates, shrinking them to the median trades
        local adaptivity for stability.
        """
        if not max_false_merge > 0:
            raise ValueError(f"max_false_merge must be > 0, got {max_false_merge}")
        own = self.scale * float(max_false_merge) ** (1.0 / self.exponent)
        if own.size == 0 or density >= 1:
            return own
        return own**density * float(np.median(own)) ** (1.0 - density)

    def false_share(self, distances: np.ndarray, cuts: np.ndarray) -> np.ndarray:
        """For each cut d: the share of the k-NN pairs closer than d that the model expects to be
        strangers (sum over faces of expected strangers within d / neighbours found within d)."""
        d = np.asarray(distances, dtype=np.float64)
        found = np.sort(d[np.isfinite(d)].ravel())
        cuts = np.asarray(cuts, dtype=np.float64)
        observed = np.searchsorted(found, cuts, side="left").astype(np.float64)
        scale = self.scale[np.isfinite(self.scale) & (self.scale > 0)]
        expected = np.array([((c / scale) ** self.exponent).sum() for c in cuts])
        return expected / np.maximum(observed, 1.0)

    def cut(self, distances: np.ndarray, max_false_merge: float, points: int = 256) -> float:
        """The largest distance at which at most ``max_false_merge`` of the pairs closer than it
        are strangers by the model: a false-discovery bound on same-identity pairs.

        Where many faces have close photos of their own person (big identities) the observed
        pairs outnumber the expected strangers and the cut reaches further; in a pool of lone
        faces it stays tight. Candidates: ``points`` quantiles of the k-NN distances below the
        median distance at the first fitted rank.
        """
        if not 0 < max_false_merge < 1:
            raise ValueError(f"max_false_merge must be in (0, 1), got {max_false_merge}")
        d = np.asarray(distances, dtype=np.float64)
        finite = d[np.isfinite(d)]
        if finite.size == 0:
            return 0.0
        top = float(np.median(d[:, min(self.ranks[0], d.shape[1]) - 1]))
        below = finite[finite <= top]
        if below.size == 0:
            return float(finite.min())
        cuts = np.unique(np.quantile(below, np.linspace(0.0, 1.0, points)))
        ok = np.flatnonzero(self.false_share(d, cuts) <= max_false_merge)
        return float(cuts[ok.max()]) if ok.size else float(cuts[0])

    def radii(self, cut: float, density: float) -> np.ndarray:
        """(N,) per-face radii around a pool-wide ``cut``: each face's own scale relative to the
        median, to the power ``density`` (0: every face gets the cut; 1: fully local)."""
        scale = np.where(np.isfinite(self.scale) & (self.scale > 0), self.scale, np.nan)
        med = np.nanmedian(scale) if np.isfinite(scale).any() else 1.0
        rel = np.where(np.isfinite(scale), scale / med, 1.0)
        return float(cut) * rel ** float(density)

    def summary(self) -> dict:
        return {
            "exponent": round(float(self.exponent), 4),
            "scale_median": round(float(np.median(self.scale)), 5) if self.scale.size else None,
            "ranks": list(self.ranks),
        }


def fit_impostor_model(
    distances: np.ndarray, rank_start: int = RANK_START, default_exponent: float = 12.0
) -> ImpostorModel:
    """Fit the stranger-count model on each face's sorted k-NN cosine distances.

    Args:
        distances: (N, k) cosine distances of every face's k nearest neighbours, ascending per row
            (missing neighbours as ``inf``).
        rank_start: first rank (1-based) treated as strangers; needs at least ``MIN_FIT_RANKS``
            ranks up to k. Smaller pools (k ranks not available) use what they have.
        default_exponent: used when no row has enough neighbours to fit (tiny sets).

    Returns:
        An :class:`ImpostorModel`.
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"expected (N, k) distances, got shape {d.shape}")
    n, k = d.shape
    lo = max(1, min(rank_start, k - MIN_FIT_RANKS + 1))
    ranks = np.arange(lo, k + 1, dtype=np.float64)
    block = np.maximum(d[:, lo - 1 :], 1e-6)
    finite = np.isfinite(block).all(axis=1)
    if n == 0 or ranks.size < 2 or not finite.any():
        scale = np.full(n, np.inf)
        return ImpostorModel(scale=scale, exponent=float(default_exponent), ranks=(lo, k))
    logr = np.log(ranks)
    logd = np.log(block[finite])
    xr = logr - logr.mean()
    slopes = (logd - logd.mean(axis=1, keepdims=True)) @ xr / (xr @ xr)
    # Duplicate-heavy rows can give zero slopes; the median over the set is robust to them.
    slope = float(np.median(slopes[slopes > 0])) if (slopes > 0).any() else 1.0 / default_exponent
    exponent = 1.0 / slope
    scale = np.full(n, np.nan)
    # log d_r = log scale + log(r) / exponent, averaged over the fitted ranks.
    scale[finite] = np.exp((logd - slope * logr).mean(axis=1))
    # Rows an approximate index left short of neighbours get the set's typical scale.
    scale[~finite] = np.median(scale[finite])
    return ImpostorModel(scale=scale, exponent=exponent, ranks=(lo, k))
