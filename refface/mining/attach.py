"""Second pass of the identity clustering: fragments and lone faces join the cluster they agree with.

Average linkage at the impostor model's cut is precise but, on a large pool, leaves two kinds of
same-identity pairs out, both just past the cut:

- **split identities**: one person's photos in two clusters (14 + 5, 7 + 6 + 4) whose mean
  distance sits at 1.0-1.07 radii. Look-alike *strangers* can sit as close (on the shared photos
  Koizumi and Roh Moo-hyun, 10 photos each, are 1.04 radii apart), but they are tight clusters
  far apart for their spread, while a split person's fragments are about as far from each other
  as their own photos are from one another. Two clusters of two or more faces merge when their
  mean distance is below ``fragment_distance`` radii **and** below ``fragment_spread`` times the
  geometric mean of their own mean within-cluster distances (:func:`merge_fragments`).
- **unusual photos** (profile, sunglasses, twenty years younger) left alone. Distance alone
  cannot take them back (strangers sit at the same distances), but ranks can: a lone face joins
  cluster ``C`` only when its ``top`` nearest neighbours all belong to ``C`` (the face points at
  one person), at least ``agree`` of ``C``'s members hold it among their ``|C| + slack`` nearest
  neighbours (the person points back: a stranger near ``C`` fails here, ``C``'s members have their
  own look-alikes closer), and its mean distance to ``C`` is below ``max_distance`` radii and
  below ``lone_spread`` times ``C``'s own mean distance between members (:func:`attach_lone_faces`).

Everything runs on the k-NN lists, O(N k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refface.mining.linkage import mutual_nearest

# Chosen on the tuning half of lfw_dev's people and the shared photos, dlib embeddings with the
# default --tta flip (docs/mining.md).
TOP = 3
AGREE = 0.7
MAX_DISTANCE = 1.2
SLACK = 3
LONE_SPREAD = 1.8
FRAGMENT_DISTANCE = 1.05
FRAGMENT_SPREAD = 1.4
# Fragments of BIG_FRAGMENT+ faces each: their mean is over 16+ pairs, a steadier figure.
BIG_FRAGMENT = 4
BIG_FRAGMENT_DISTANCE = 1.1
BIG_FRAGMENT_SPREAD = 1.5
FRAGMENT_ROUNDS = 3
LONE_ROUNDS = 2


@dataclass(frozen=True)
class AttachConfig:
    """When a fragment or a lone face joins a cluster (see the module docstring)."""

    top: int = TOP
    agree: float = AGREE
    max_distance: float = MAX_DISTANCE
    slack: int = SLACK
    lone_spread: float = LONE_SPREAD
    fragment_distance: float = FRAGMENT_DISTANCE
    fragment_spread: float = FRAGMENT_SPREAD
    big_fragment: int = BIG_FRAGMENT
    big_fragment_distance: float = BIG_FRAGMENT_DISTANCE
    big_fragment_spread: float = BIG_FRAGMENT_SPREAD
    fragment_rounds: int = FRAGMENT_ROUNDS
    lone_rounds: int = LONE_ROUNDS

    def validate(self) -> AttachConfig:
        if self.top < 1:
            raise ValueError(f"top must be >= 1, got {self.top}")
        if not 0 < self.agree <= 1:
            raise ValueError(f"agree must be in (0, 1], got {self.agree}")
        if self.max_distance <= 0:
            raise ValueError(f"max_distance must be > 0, got {self.max_distance}")
        if self.slack < 0:
            raise ValueError(f"slack must be >= 0, got {self.slack}")
        settings = {
            "fragment_distance": self.fragment_distance,
            "fragment_spread": self.fragment_spread,
            "big_fragment": self.big_fragment,
            "big_fragment_distance": self.big_fragment_distance,
            "big_fragment_spread": self.big_fragment_spread,
            "fragment_rounds": self.fragment_rounds,
            "lone_rounds": self.lone_rounds,
            "lone_spread": self.lone_spread,
        }
        negative = [f"{name}={value}" for name, value in settings.items() if value < 0]
        if negative:
            raise ValueError(f"second-pass settings must be >= 0, got {', '.join(negative)}")
        return self


def _sum_pairs(a: np.ndarray, b: np.ndarray, n: int, *values: np.ndarray):
    """Unique (a, b) pairs (a <= b expected) with ``values`` summed over duplicates, and the count."""
    key, inverse = np.unique(a * n + b, return_inverse=True)
    inverse = inverse.ravel()
    sums = [np.bincount(inverse, weights=v, minlength=key.size) for v in values]
    return key // n, key % n, np.bincount(inverse, minlength=key.size).astype(np.float64), *sums


def merge_fragments(
    labels: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    dist: np.ndarray,
    missing: float,
    config: AttachConfig | None = None,
) -> np.ndarray:
    """Merge clusters of two or more faces that are one person's fragments.

    Two clusters merge when their mean distance (pairs absent from the graph count as
    ``missing``) is below ``fragment_distance`` and below ``fragment_spread`` times the geometric
    mean of their mean within-cluster distances (over the pairs the graph holds); clusters of
    ``big_fragment`` or more faces each, whose mean is over 16+ pairs and so a steadier figure,
    merge under ``big_fragment_distance`` and ``big_fragment_spread`` instead. Each round
    merges the pairs of clusters that are each other's closest passing partner, up to
    ``fragment_rounds`` rounds.

    Args:
        labels: (N,) cluster ids.
        rows, cols, dist: the graph's edges (either direction or both; duplicates are one pair),
            distances in radius units, all below ``missing``.
        missing: the distance a pair outside the graph counts as.
        config: the rule's settings.

    Returns:
        (N,) compact cluster ids.
    """
    cfg = (config or AttachConfig()).validate()
    lab = np.unique(np.asarray(labels), return_inverse=True)[1].astype(np.int64).ravel()
    n = lab.size
    keep = rows != cols
    lo = np.minimum(rows[keep], cols[keep]).astype(np.int64)
    hi = np.maximum(rows[keep], cols[keep]).astype(np.int64)
    if lo.size == 0 or cfg.fragment_rounds == 0:
        return lab
    # One distance per face pair.
    key, first = np.unique(lo * n + hi, return_index=True)
    lo, hi, d = key // n, key % n, np.asarray(dist, dtype=np.float64)[keep][first]
    for _ in range(cfg.fragment_rounds):
        k = int(lab.max()) + 1
        size = np.bincount(lab, minlength=k).astype(np.float64)
        a, b = lab[lo], lab[hi]
        same = a == b
        within_sum = np.bincount(a[same], weights=d[same], minlength=k)
        within_n = np.bincount(a[same], minlength=k)
        within = np.where(within_n > 0, within_sum / np.maximum(within_n, 1), np.nan)
        ca, cb = np.minimum(a[~same], b[~same]), np.maximum(a[~same], b[~same])
        if ca.size == 0:
            break
        ca, cb, count, dsum = _sum_pairs(ca, cb, k, d[~same])
        pairs = size[ca] * size[cb]
        mean = (dsum + (pairs - count) * missing) / pairs
        with np.errstate(invalid="ignore"):
            spread = np.sqrt(within[ca] * within[cb])
            smaller = np.minimum(size[ca], size[cb])
            ok = (smaller > 1) & (mean < cfg.fragment_distance) & (mean < cfg.fragment_spread * spread)
            ok |= (
                (smaller >= max(cfg.big_fragment, 2))
                & (mean < cfg.big_fragment_distance)
                & (mean < cfg.big_fragment_spread * spread)
            )
        if not ok.any():
            break
        # Each cluster's closest passing partner (ties by the smaller id); merge mutual pairs.
        mutual, best = mutual_nearest(ca[ok], cb[ok], mean[ok], k)
        if mutual.size == 0:
            break
        target = np.arange(k, dtype=np.int64)
        target[best[mutual]] = mutual
        lab = np.unique(target[lab], return_inverse=True)[1].astype(np.int64).ravel()
    return lab


def attach_lone_faces(
    labels: np.ndarray,
    idx: np.ndarray,
    norm: np.ndarray,
    missing: float,
    config: AttachConfig | None = None,
) -> np.ndarray:
    """Join lone faces to the cluster their neighbours agree on.

    Args:
        labels: (N,) cluster ids (any integers; a face alone is a cluster of one).
        idx: (N, k) each face's nearest neighbours, nearest first (-1 = missing).
        norm: (N, k) the matching distances in units of each pair's same-identity radius.
        missing: the distance a pair outside the k-NN lists (or ``>= missing``) counts as.
        config: the rule's settings.

    Returns:
        (N,) cluster ids (compact, not canonical): the input clusters, some lone faces added.
        Up to ``lone_rounds`` rounds: a face that joined can complete another lone face's
        nearest neighbours (two unusual photos of one person next to each other).
    """
    cfg = (config or AttachConfig()).validate()
    lab = np.unique(np.asarray(labels), return_inverse=True)[1].astype(np.int64).ravel()
    for _ in range(cfg.lone_rounds):
        joined = _attach_round(lab, idx, norm, missing, cfg)
        if (joined == lab).all():
            break
        lab = joined
    return np.unique(lab, return_inverse=True)[1].astype(np.int64).ravel()


def _attach_round(lab: np.ndarray, idx: np.ndarray, norm: np.ndarray, missing: float, cfg: AttachConfig):
    """One round of :func:`attach_lone_faces` on compact labels."""
    n, k = idx.shape
    if n == 0 or k == 0:
        return lab
    size = np.bincount(lab)
    top = min(cfg.top, k)
    head = idx[:, :top]
    target = lab[np.maximum(head[:, 0], 0)]
    lone = size[lab] == 1
    cand = (
        lone
        & (head >= 0).all(axis=1)
        & (lab[np.maximum(head, 0)] == target[:, None]).all(axis=1)
        & (size[target] > 1)
    )
    if not cand.any():
        return lab
    # The person points back: members of the target cluster holding the lone face within their
    # |C| + slack nearest neighbours (each member lists a face at most once).
    rank = np.broadcast_to(np.arange(k), (n, k))
    owner = np.broadcast_to(lab[:, None], (n, k))
    nb = np.maximum(idx, 0)
    back = (idx >= 0) & cand[nb] & (target[nb] == owner) & (rank < size[owner] + cfg.slack)
    agree = np.bincount(nb[back], minlength=n) / size[target]
    # Mean distance to the cluster, in radius units; members outside the face's list count as
    # ``missing``.
    inside = (idx >= 0) & (lab[nb] == target[:, None])
    found = np.where(inside, np.minimum(norm, missing), 0.0).sum(axis=1)
    count = inside.sum(axis=1)
    mean = (found + (size[target] - count) * missing) / size[target]
    # ... and no farther than ``lone_spread`` times the cluster's own mean distance between its
    # members (over the pairs their lists hold).
    own = (idx >= 0) & (lab[nb] == lab[:, None])
    within_sum = np.bincount(lab, weights=np.where(own, np.minimum(norm, missing), 0.0).sum(axis=1))
    within_n = np.bincount(lab, weights=own.sum(axis=1).astype(np.float64))
    within = within_sum / np.maximum(within_n, 1.0)
    join = cand & (agree >= cfg.agree) & (mean < cfg.max_distance) & (mean < cfg.lone_spread * within[target])
    lab = lab.copy()
    lab[join] = target[join]
    return lab
