"""Cluster quality against ground-truth identities: pairwise and BCubed P/R/F, NMI, cluster counts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

SINGLETON = -1


@dataclass(frozen=True)
class ClusterScores:
    """Scores of a predicted clustering against true identities over the same scored items."""

    n_items: int
    n_identities: int
    n_clusters: int
    pairwise_precision: float
    pairwise_recall: float
    pairwise_f: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f: float
    nmi: float
    n_unlabeled: int = 0
    n_unclustered: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _f(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _codes(labels: npt.ArrayLike) -> np.ndarray:
    """Dense integer codes of arbitrary labels (strings, ints)."""
    _, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64)


def explode_singletons(pred: np.ndarray) -> np.ndarray:
    """Give every ``-1`` (singleton) prediction its own cluster id, so singletons never pool."""
    pred = np.asarray(pred, dtype=np.int64).copy()
    lone = pred == SINGLETON
    start = pred.max() + 1 if pred.size and (~lone).any() else 0
    pred[lone] = start + np.arange(int(lone.sum()))
    return pred


def contingency(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-zero cells of the identity x cluster table.

    Returns:
        (n_ij, true_of_cell, pred_of_cell): counts of each occupied (identity, cluster) cell.
        Cost is O(N log N); the table is never densified.
    """
    true = np.asarray(true, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    if true.shape != pred.shape:
        raise ValueError(f"label arrays differ in length: {true.shape} vs {pred.shape}")
    cells, n_ij = np.unique(np.stack([true, pred], axis=1), axis=0, return_counts=True)
    return n_ij.astype(np.int64), cells[:, 0], cells[:, 1]


def pairwise_prf(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """Pairwise precision/recall/F from contingency counts (no O(N^2) pair enumeration).

    A pair is a true positive when both items share an identity and a cluster. With no
    predicted pairs precision is 1 (nothing wrongly merged); with no true pairs recall is 1.
    """
    n_ij, ti, pj = contingency(true, pred)
    a = np.bincount(ti, weights=n_ij)
    b = np.bincount(pj, weights=n_ij)
    tp = float((n_ij * (n_ij - 1) // 2).sum())
    pred_pairs = float((b * (b - 1) / 2).sum())
    true_pairs = float((a * (a - 1) / 2).sum())
    p = tp / pred_pairs if pred_pairs else 1.0
    r = tp / true_pairs if true_pairs else 1.0
    return p, r, _f(p, r)


def bcubed_prf(true: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """BCubed precision/recall/F (Bagga & Baldwin): per-item averages of cluster/identity overlap."""
    n_ij, ti, pj = contingency(true, pred)
    n = float(n_ij.sum())
    if n == 0:
        return 1.0, 1.0, 1.0
    a = np.bincount(ti, weights=n_ij)
    b = np.bincount(pj, weights=n_ij)
    # Each of the n_ij items in cell (i, j) has precision n_ij / |cluster j| and recall n_ij / |identity i|.
    p = float((n_ij.astype(np.float64) ** 2 / b[pj]).sum() / n)
    r = float((n_ij.astype(np.float64) ** 2 / a[ti]).sum() / n)
    return p, r, _f(p, r)


def nmi(true: np.ndarray, pred: np.ndarray) -> float:
    """Normalized mutual information (arithmetic normalization, as scikit-learn's default)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(true, pred))


def score_labels(true: npt.ArrayLike, pred: npt.ArrayLike) -> ClusterScores:
    """Score predicted cluster ids against true identities for the same items.

    Args:
        true: identity of each item (any hashable labels).
        pred: predicted cluster id of each item; ``-1`` means a singleton (its own cluster).
    """
    t = _codes(true)
    p = explode_singletons(np.asarray(pred, dtype=np.int64))
    pp, pr, pf = pairwise_prf(t, p)
    bp, br, bf = bcubed_prf(t, p)
    return ClusterScores(
        n_items=int(t.size),
        n_identities=int(np.unique(t).size),
        n_clusters=int(np.unique(p).size),
        pairwise_precision=pp,
        pairwise_recall=pr,
        pairwise_f=pf,
        bcubed_precision=bp,
        bcubed_recall=br,
        bcubed_f=bf,
        nmi=nmi(t, p) if t.size else 1.0,
    )


def evaluate_assignments(assignments: Mapping[str, int], labels: Mapping[str, str | None]) -> ClusterScores:
    """Score a path -> cluster id mapping against a path -> identity mapping.

    Only labeled paths are scored (an empty or missing identity means unknown and is excluded).
    A labeled path the clustering never saw (no face found, unreadable file) is scored as a
    singleton, so missed images cost recall instead of vanishing; ``n_unclustered`` counts them.
    """
    labeled = {p: str(i) for p, i in labels.items() if i is not None and str(i).strip() not in ("", "nan")}
    paths = sorted(labeled)
    missing = [p for p in paths if p not in assignments]
    pred = np.array([int(assignments.get(p, SINGLETON)) for p in paths], dtype=np.int64)
    scores = score_labels([labeled[p] for p in paths], pred)
    unlabeled = sum(1 for p in assignments if p not in labeled)
    return ClusterScores(**{**scores.as_dict(), "n_unlabeled": unlabeled, "n_unclustered": len(missing)})
