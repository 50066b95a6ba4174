"""Reference selection: which images of the same identity serve as references for a target, in what order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("cosine", "euclidean")
# ReF-LDM excludes test references closer than 0.1 to the target with an ArcFace threshold of 0.4:
# the near-duplicate bar is a quarter of the identity threshold, which carries over to other embedders.
NEAR_DUPLICATE_RATIO = 0.25


REF_ORDERS = ("farthest", "nearest", "random")


@dataclass(frozen=True)
class ReferenceConfig:
    """Rules for reference lists (defaults from ReF-LDM).

    Attributes:
        min_refs: a val/test target needs at least this many references (after exclusions) to be listed.
        max_refs: keep at most this many val/test references, in farthest-point order.
        near_duplicate_distance: val/test references closer than this to the target are dropped;
            None = ``NEAR_DUPLICATE_RATIO`` x the identity threshold (0.1 for ArcFace at 0.4).
        within_threshold: references must also lie within the identity threshold of the target itself,
            not only in its cluster (ReF-LDM's files are named ``arcface0-04`` / ``arcface01-04``);
            this keeps chained cluster members out of the lists.
        train_exclude_near_duplicates: apply the near-duplicate rule to training lists too.
        ref_order: order (and, with ``max_refs``, choice) of val/test references: ``farthest``
            (farthest-point sampling seeded with the target, as the paper; the first pick is the view
            least like the target), ``nearest`` (ascending distance) or ``random`` (a fixed shuffle per
            target). ReF-LDM's inference takes the first five.
        order_seed: seed of the ``random`` order.
    """

    min_refs: int = 2
    max_refs: int = 9
    near_duplicate_distance: float | None = None
    within_threshold: bool = True
    train_exclude_near_duplicates: bool = False
    ref_order: str = "farthest"
    order_seed: int = 0

    def __post_init__(self) -> None:
        if self.ref_order not in REF_ORDERS:
            raise ValueError(f"ref_order must be one of {', '.join(REF_ORDERS)}, got {self.ref_order!r}")
        if self.min_refs < 1:
            raise ValueError(f"min_refs must be >= 1, got {self.min_refs}")
        if self.max_refs < self.min_refs:
            raise ValueError(f"max_refs ({self.max_refs}) must be >= min_refs ({self.min_refs})")
        if self.near_duplicate_distance is not None and self.near_duplicate_distance < 0:
            raise ValueError("near_duplicate_distance must be >= 0 (or None for the default)")

    def near_duplicate(self, identity_threshold: float) -> float:
        if self.near_duplicate_distance is not None:
            return float(self.near_duplicate_distance)
        return NEAR_DUPLICATE_RATIO * float(identity_threshold)


def distance_matrix(a: np.ndarray, b: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Distances between rows of L2-normalized ``a`` (M, D) and ``b`` (N, D) in the embedder's metric.

    ``cosine`` is 1 - dot; ``euclidean`` is the L2 distance, which for unit vectors is sqrt(2 - 2 dot).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    dots = a @ b.T
    if metric == "cosine":
        return 1.0 - dots
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * dots
    return np.sqrt(np.maximum(sq, 0.0))


def farthest_point_order(target: np.ndarray, candidates: np.ndarray, metric: str = "cosine") -> list[int]:
    """Order candidates by farthest-point sampling, seeded with the target.

    The first pick is the candidate farthest from the target; each next pick maximizes its distance to
    the nearest already chosen point (target included), so the first k are the most varied k views.
    Ties go to the lower index, so the order is deterministic for a fixed candidate order.

    Args:
        target: (D,) embedding of the target.
        candidates: (N, D) embeddings of the candidate references.
        metric: distance convention of the embeddings.

    Returns:
        A permutation of ``range(N)``.
    """
    n = len(candidates)
    if n == 0:
        return []
    nearest = distance_matrix(target[None, :], candidates, metric)[0]
    pairwise = distance_matrix(candidates, candidates, metric)
    order: list[int] = []
    taken = np.zeros(n, dtype=bool)
    for _ in range(n):
        # Round so float noise between BLAS builds cannot flip a tie.
        score = np.where(taken, -np.inf, np.round(nearest, 9))
        pick = int(np.argmax(score))
        order.append(pick)
        taken[pick] = True
        nearest = np.minimum(nearest, pairwise[pick])
    return order


def select_for_target(
    target: int,
    members: Sequence[int],
    vectors: np.ndarray,
    metric: str,
    identity_threshold: float,
    config: ReferenceConfig,
    evaluation: bool,
    duplicates: set[int] | None = None,
) -> list[int]:
    """Reference rows for one target among its identity's ``members`` (row indices into ``vectors``).

    Training lists hold every other member (in the members' order); val/test lists drop near-duplicates,
    keep at most ``max_refs`` in farthest-point order and are empty when fewer than ``min_refs`` remain.
    ``duplicates`` holds rows that are byte-identical to the target (always excluded).
    """
    others = [m for m in members if m != target and not (duplicates and m in duplicates)]
    if not others:
        return []
    cand = vectors[others]
    dist = distance_matrix(vectors[target][None, :], cand, metric)[0]
    keep = np.ones(len(others), dtype=bool)
    if config.within_threshold:
        keep &= dist < identity_threshold
    if evaluation or config.train_exclude_near_duplicates:
        keep &= dist >= config.near_duplicate(identity_threshold)
    kept = [o for o, k in zip(others, keep, strict=True) if k]
    if not evaluation:
        return kept
    if len(kept) < config.min_refs:
        return []
    order = reference_order(vectors[target], vectors[kept], metric, config, key=target)
    return [kept[i] for i in order[: config.max_refs]]


def reference_order(
    target: np.ndarray, candidates: np.ndarray, metric: str, config: ReferenceConfig, key: int
) -> list[int]:
    """Candidate indices in ``config.ref_order``; ``key`` (the target's row) seeds the random order."""
    if config.ref_order == "farthest":
        return farthest_point_order(target, candidates, metric)
    if config.ref_order == "nearest":
        dist = distance_matrix(target[None, :], candidates, metric)[0]
        return [int(i) for i in np.argsort(dist, kind="stable")]
    return [int(i) for i in np.random.default_rng([config.order_seed, key]).permutation(len(candidates))]


def select_references(
    paths: Sequence[str],
    vectors: np.ndarray,
    labels: Sequence[int],
    metric: str,
    identity_threshold: float,
    config: ReferenceConfig,
    evaluation: Sequence[bool] | bool = False,
    sha256: Sequence[str] | None = None,
) -> dict[int, list[int]]:
    """Reference lists for every image with an identity (label >= 0).

    Args:
        paths: image paths, row-aligned with ``vectors``; members are visited in path order.
        vectors: (N, D) L2-normalized embeddings.
        labels: identity per row, -1 for singletons (they never get references).
        metric: ``cosine`` or ``euclidean``.
        identity_threshold: the same-identity distance bar of the embedder.
        config: reference rules.
        evaluation: per row (or for all), whether the target is in val/test (stricter rules).
        sha256: optional content hashes; byte-identical copies never reference each other.

    Returns:
        ``{row: [reference rows]}`` for rows whose list is non-empty.
    """
    labels = np.asarray(labels)
    n = len(paths)
    is_eval = np.full(n, bool(evaluation)) if isinstance(evaluation, bool) else np.asarray(evaluation, bool)
    order = sorted(range(n), key=lambda i: paths[i])
    groups: dict[int, list[int]] = {}
    for i in order:
        if labels[i] >= 0:
            groups.setdefault(int(labels[i]), []).append(i)
    out: dict[int, list[int]] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        dupes: dict[str, set[int]] = {}
        if sha256 is not None:
            for m in members:
                dupes.setdefault(sha256[m], set()).add(m)
        for t in members:
            refs = select_for_target(
                t,
                members,
                vectors,
                metric,
                identity_threshold,
                config,
                bool(is_eval[t]),
                dupes.get(sha256[t]) if sha256 is not None else None,
            )
            if refs:
                out[t] = refs
    return out
