"""Reference selection: which images of the same identity serve as references for a target, in what order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

METRICS = ("cosine", "euclidean")
# ReF-LDM excludes test references closer than 0.1 to the target with an ArcFace threshold of 0.4:
# the near-duplicate bar is a quarter of the identity threshold, which carries over to other embedders.
NEAR_DUPLICATE_RATIO = 0.25
# Precision-first reference rule: the impostor model's chance that a reference shows a stranger.
MAX_FALSE_REFERENCE = 0.01


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
            not only in its cluster (ReF-LDM's files are named ``arcface0-04`` / ``arcface01-04``),
            and both the target and the reference must lie within it of their cluster *on average*
            (mean distance to the other members): a face that joined through a chain of
            look-alikes is near one member but far from the rest, and gets no references and
            serves as none.
        train_exclude_near_duplicates: apply the near-duplicate rule to training lists too.
        ref_order: order (and, with ``max_refs``, choice) of val/test references: ``farthest``
            (farthest-point sampling seeded with the target, as the paper; the first pick is the view
            least like the target), ``nearest`` (ascending distance) or ``random`` (a fixed shuffle per
            target). ReF-LDM's inference takes the first five.
        order_seed: seed of the ``random`` order.
        max_false_reference: with an impostor model (the ``impostor`` clustering), a reference is
            kept only while the model's chance that it shows a stranger stays at or below this
            (see :func:`stranger_chance`): the precision-first rule.
    """

    min_refs: int = 2
    max_refs: int = 9
    near_duplicate_distance: float | None = None
    within_threshold: bool = True
    train_exclude_near_duplicates: bool = False
    ref_order: str = "farthest"
    order_seed: int = 0
    max_false_reference: float = MAX_FALSE_REFERENCE

    def __post_init__(self) -> None:
        if self.ref_order not in REF_ORDERS:
            raise ValueError(f"ref_order must be one of {', '.join(REF_ORDERS)}, got {self.ref_order!r}")
        if self.min_refs < 1:
            raise ValueError(f"min_refs must be >= 1, got {self.min_refs}")
        if self.max_refs < self.min_refs:
            raise ValueError(f"max_refs ({self.max_refs}) must be >= min_refs ({self.min_refs})")
        if not 0 < self.max_false_reference <= 1:
            raise ValueError(f"max_false_reference must be in (0, 1], got {self.max_false_reference}")
        if self.near_duplicate_distance is not None and self.near_duplicate_distance < 0:
            raise ValueError("near_duplicate_distance must be >= 0 (or None for the default)")

    def near_duplicate(self, identity_threshold):
        """The near-duplicate bar for a same-identity bar (a number or an array of pair bars)."""
        if self.near_duplicate_distance is not None:
            return float(self.near_duplicate_distance)
        if np.ndim(identity_threshold):
            return NEAR_DUPLICATE_RATIO * np.asarray(identity_threshold, dtype=np.float64)
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


def _pair_bar(identity_threshold, a: int, b: np.ndarray) -> np.ndarray:
    """The same-identity bar between row ``a`` and rows ``b``: a scalar, or the geometric mean of
    per-row radii."""
    if np.ndim(identity_threshold) == 0:
        return np.full(len(b), float(identity_threshold))
    radius = np.asarray(identity_threshold, dtype=np.float64)
    return np.sqrt(radius[a] * radius[np.asarray(b, dtype=np.int64)])


def cluster_agreement(
    members: Sequence[int], vectors: np.ndarray, metric: str, identity_threshold
) -> np.ndarray:
    """Per member, its mean distance to the other members in units of their pair bars (< 1: the
    member agrees with its cluster, as average linkage would keep it)."""
    members = list(members)
    if len(members) < 2:
        return np.zeros(len(members))
    dist = distance_matrix(vectors[members], vectors[members], metric)
    bars = np.stack([_pair_bar(identity_threshold, m, np.asarray(members)) for m in members])
    ratio = dist / bars
    np.fill_diagonal(ratio, 0.0)
    return ratio.sum(axis=1) / (len(members) - 1)


def stranger_chance(dist: np.ndarray, scale: np.ndarray, exponent: float) -> np.ndarray:
    """Pairwise chance that two members of a cluster are strangers, by the impostor model.

    Around face ``a`` the model expects ``(d / scale_a) ** exponent`` strangers within distance
    ``d``, while ``n`` other members of its cluster lie that close; the chance that one of them is
    a stranger is ``min(1, expected / n)``. The pair's chance is the mean over its two ends.
    Faces outside the cluster are not counted in ``n``, so the chance errs high.

    Args:
        dist: (M, M) distances between the cluster's members.
        scale: (M,) the members' impostor scales.
        exponent: the model's exponent.
    """
    dist = np.asarray(dist, dtype=np.float64)
    m = dist.shape[0]
    # Members within each row's distance d, self excluded: the rank of d in the sorted row.
    ranks = np.argsort(np.argsort(dist, axis=1, kind="stable"), axis=1, kind="stable")
    within = np.maximum(ranks, 1)  # rank 0 is self (distance 0)
    scale = np.asarray(scale, dtype=np.float64)
    ok = np.isfinite(scale) & (scale > 0)
    safe = np.where(ok, scale, 1.0)
    expected = (np.maximum(dist, 0.0) / safe[:, None]) ** float(exponent)
    expected[~ok] = np.inf
    one_end = np.minimum(1.0, expected / within)
    chance = (one_end + one_end.T) / 2
    chance[np.arange(m), np.arange(m)] = 0.0
    return chance


def select_for_target(
    target: int,
    members: Sequence[int],
    vectors: np.ndarray,
    metric: str,
    identity_threshold,
    config: ReferenceConfig,
    evaluation: bool,
    duplicates: set[int] | None = None,
    agrees: dict[int, bool] | None = None,
    trusted: set[int] | None = None,
) -> list[int]:
    """Reference rows for one target among its identity's ``members`` (row indices into ``vectors``).

    Training lists hold every other member (in the members' order); val/test lists drop near-duplicates,
    keep at most ``max_refs`` in farthest-point order and are empty when fewer than ``min_refs`` remain.
    ``duplicates`` holds rows that are byte-identical to the target (always excluded).
    ``identity_threshold`` is a scalar or per-row radii (a pair's bar is their geometric mean);
    ``agrees`` maps members to whether they agree with their cluster (see :func:`cluster_agreement`);
    ``trusted``, when given, holds the only members the impostor model lets serve this target.
    """
    if config.within_threshold and agrees is not None and not agrees.get(target, True):
        return []
    others = [m for m in members if m != target and not (duplicates and m in duplicates)]
    if not others:
        return []
    cand = vectors[others]
    dist = distance_matrix(vectors[target][None, :], cand, metric)[0]
    keep = np.ones(len(others), dtype=bool)
    if config.within_threshold:
        keep &= dist < _pair_bar(identity_threshold, target, np.asarray(others))
        if agrees is not None:
            keep &= np.array([agrees.get(o, True) for o in others], dtype=bool)
        if trusted is not None:
            keep &= np.array([o in trusted for o in others], dtype=bool)
    if evaluation or config.train_exclude_near_duplicates:
        keep &= dist >= config.near_duplicate(_pair_bar(identity_threshold, target, np.asarray(others)))
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
    labels: npt.ArrayLike,
    metric: str,
    identity_threshold,
    config: ReferenceConfig,
    evaluation: Sequence[bool] | bool = False,
    sha256: Sequence[str] | None = None,
    impostor: tuple[np.ndarray, float] | None = None,
) -> dict[int, list[int]]:
    """Reference lists for every image with an identity (label >= 0).

    Args:
        paths: image paths, row-aligned with ``vectors``; members are visited in path order.
        vectors: (N, D) L2-normalized embeddings.
        labels: identity per row, -1 for singletons (they never get references).
        metric: ``cosine`` or ``euclidean``.
        identity_threshold: the same-identity distance bar: one number, or per-row radii (from the
            ``impostor`` clustering; a pair's bar is the geometric mean of its two radii).
        config: reference rules.
        evaluation: per row (or for all), whether the target is in val/test (stricter rules).
        sha256: optional content hashes; byte-identical copies never reference each other.
        impostor: ``(scale per row, exponent)`` of the set's impostor model: with ``within_threshold``
            a reference must also have a stranger chance <= ``config.max_false_reference``.

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
        agrees = None
        chance = None
        if config.within_threshold:
            score = cluster_agreement(members, vectors, metric, identity_threshold)
            agrees = {m: bool(v < 1.0) for m, v in zip(members, score, strict=True)}
            if impostor is not None:
                scale, exponent = impostor
                dist = distance_matrix(vectors[members], vectors[members], metric)
                chance = stranger_chance(dist, np.asarray(scale)[members], exponent)
        for pos, t in enumerate(members):
            trusted = None
            if chance is not None:
                trusted = {
                    m for m, c in zip(members, chance[pos], strict=True) if c <= config.max_false_reference
                }
            refs = select_for_target(
                t,
                members,
                vectors,
                metric,
                identity_threshold,
                config,
                bool(is_eval[t]),
                dupes.get(sha256[t]) if sha256 is not None else None,
                agrees,
                trusted,
            )
            if refs:
                out[t] = refs
    return out


def estimated_reference_precision(
    refs: dict[int, list[int]],
    vectors: np.ndarray,
    labels: npt.ArrayLike,
    scale: np.ndarray,
    exponent: float,
    metric: str = "cosine",
) -> dict:
    """Label-free estimate of the share of (target, reference) pairs that show one person: one
    minus the mean :func:`stranger_chance` of the listed pairs (it errs low).

    Returns:
        ``{"estimate", "pairs", "expected_false"}`` (estimate NaN without pairs).
    """
    labels = np.asarray(labels)
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        if lab >= 0:
            groups.setdefault(int(lab), []).append(i)
    false = 0.0
    pairs = 0
    for members in groups.values():
        chosen = [(t, r) for t in members for r in refs.get(t, [])]
        if not chosen:
            continue
        dist = distance_matrix(vectors[members], vectors[members], metric)
        chance = stranger_chance(dist, np.asarray(scale)[members], exponent)
        pos = {m: i for i, m in enumerate(members)}
        false += float(sum(chance[pos[t], pos[r]] for t, r in chosen))
        pairs += len(chosen)
    estimate = 1.0 - false / pairs if pairs else float("nan")
    return {"estimate": round(estimate, 5), "pairs": pairs, "expected_false": round(false, 3)}
