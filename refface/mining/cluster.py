"""Identity clustering of face embeddings: threshold-graph components and sparse average linkage."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from refface.manifests.atomic import write_parquet
from refface.manifests.embeddings import ARCFACE_THRESHOLD, embeddings_files, load_embeddings
from refface.manifests.layout import IDENTITIES
from refface.mining import communities
from refface.mining.attach import AttachConfig, attach_lone_faces, merge_fragments
from refface.mining.impostor import MIN_FIT_RANKS, RANK_START, fit_impostor_model
from refface.mining.linkage import average_linkage_graph
from refface.mining.metrics import SINGLETON
from refface.mining.neighbors import knn, threshold_graph
from refface.stages import folder_fingerprint, run_stage

log = logging.getLogger(__name__)

STAGE = "identities"
STAGE_VERSION = 3
DEFAULT_METHOD = "impostor"
# Cosine-distance threshold used when the embeddings carry none: ReF-LDM's ArcFace rule.

# Cut heights of average linkage per embedding model, measured against labels (docs/mining.md).
# dlib's pairwise rule (Euclidean 0.6 on raw descriptors, cosine ~0.088 on unit vectors) is too
# loose as an *average* cut: whole same-gender/same-ethnicity identities then merge pairwise.
# On the shared labeled photos F stays >= 0.96 for cuts 0.07-0.085; 0.075 scores best there and
# keeps every LFW singleton alone (at 0.08 one pairs with a stranger 0.079 away). Models not listed use their own identity_threshold.
AVERAGE_THRESHOLDS = {"dlib_face_recognition_resnet_model_v1": 0.075}
# impostor: the share of same-identity pairs the set's impostor model may expect to be strangers.
# Precision-first bound for models not measured here (ArcFace: no weights offline).
MAX_FALSE_MERGE = 0.1
DENSITY = 0.5
# The default clustering per embedding model family. ``impostor``'s bound is a precision target
# (a false-discovery bound on same-identity pairs by the set's own impostor model), not a
# distance: no number carries over from one embedder's distance scale to another's. dlib's bound
# was chosen on the tuning half of lfw_dev's people and the shared photos (docs/mining.md); the
# model errs high there (it expects about three times the strangers the labels show), so the
# bound reads looser than the precision it buys.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "dlib": {"method": "impostor", "max_false_merge": 0.45},
    "arcface": {"method": "impostor", "max_false_merge": MAX_FALSE_MERGE},
    "other": {"method": "impostor", "max_false_merge": MAX_FALSE_MERGE},
}


@dataclass(frozen=True)
class ClusterConfig:
    """How to cluster.

    Attributes:
        method: a key of ``CLUSTERERS``; None = the embedding model's default (``MODEL_DEFAULTS``).
        threshold: cosine distance ``1 - <u, v>`` below which two faces are the same person
            (for ``average``: the cut on the mean distance between two groups); None means
            :func:`default_threshold`.
        k: neighbours per face in the sparse graph of the average-linkage method.
        graph_factor: the average-linkage graph keeps pairs closer than ``graph_factor * threshold``;
            pairs outside it count as exactly that far (a lower bound on their true distance).
        index: FAISS index ("auto", "flat", "ivf"), see :mod:`refface.mining.neighbors`.
        nprobe: IVF lists visited per query.
        max_false_merge: ``impostor``: the share of same-identity pairs (k-NN pairs inside the cut)
            the set's impostor model may expect to be strangers, a false-discovery bound (the
            precision target; see :mod:`refface.mining.impostor`); None = the embedding model's
            default (``MODEL_DEFAULTS``).
        density: ``impostor``: 0 gives every face the set's median radius, 1 each face its own
            (crowded regions tighter); values between blend the two geometrically.
        rank_start: ``impostor``: first neighbour rank counted as a stranger when fitting the model.
        second_pass: ``impostor``: when split fragments merge and lone faces join
            (:class:`refface.mining.attach.AttachConfig`).
    """

    method: str | None = None
    threshold: float | None = None
    k: int = 64
    graph_factor: float = 2.0
    index: str = "auto"
    nprobe: int = 32
    max_false_merge: float | None = None
    density: float = DENSITY
    rank_start: int = RANK_START
    second_pass: AttachConfig = field(default_factory=AttachConfig)

    def resolved(self, name: str, value: Any) -> Any:
        """A setting :func:`cluster` fills in before a method runs; naming it when still unset."""
        if value is None:
            raise ValueError(
                f"clustering needs {name} set (cluster() fills it from the embeddings' defaults)"
            )
        return value

    def validate(self) -> ClusterConfig:
        if self.method is not None and self.method not in CLUSTERERS:
            raise ValueError(
                f"unknown clustering method {self.method!r}; choose one of {', '.join(CLUSTERERS)}"
            )
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"threshold is a cosine distance in (0, 1], got {self.threshold}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.max_false_merge is not None and not 0 < self.max_false_merge < 1:
            raise ValueError(f"max_false_merge must be in (0, 1), got {self.max_false_merge}")
        if not 0 <= self.density <= 1:
            raise ValueError(f"density must be in [0, 1], got {self.density}")
        if self.graph_factor < 1:
            raise ValueError(
                f"graph_factor must be >= 1 (the graph must cover the threshold), got {self.graph_factor}"
            )
        self.second_pass.validate()
        return self


def cosine_threshold(value: float, metric: str) -> float:
    """Convert an identity threshold in ``metric`` units to a cosine distance on unit vectors.

    "cosine" thresholds are cosine distances already; "euclidean" ones are L2 distances between
    the unit vectors, and ``|u - v|^2 = 2 (1 - <u, v>)``.
    """
    metric = metric.lower()
    if metric in ("cosine", "cosine_distance"):
        return float(value)
    if metric in ("euclidean", "l2"):
        return float(value) ** 2 / 2.0
    raise ValueError(f"unknown embedding metric {metric!r}; expected 'cosine' or 'euclidean'")


def relabel(components: np.ndarray) -> np.ndarray:
    """Canonical labels: clusters of 2+ items numbered by size (largest first, ties by first
    member), singletons ``-1``. The same partition always gives the same labels."""
    components = np.asarray(components, dtype=np.int64)
    if components.size == 0:
        return components
    _, first, inverse, counts = np.unique(
        components, return_index=True, return_inverse=True, return_counts=True
    )
    order = np.lexsort((first, -counts))
    multi = order[counts[order] > 1]
    new = np.full(counts.size, SINGLETON, dtype=np.int64)
    new[multi] = np.arange(multi.size)
    return new[inverse.ravel()]


def components(vectors: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """ReF-LDM's rule: connected components of the graph of pairs closer than the threshold.

    Fast and exact, but one false edge joins two identities, and on large sets such edges chain
    whole populations together.
    """
    from scipy.sparse.csgraph import connected_components

    threshold = float(config.resolved("threshold", config.threshold))
    graph = threshold_graph(vectors, threshold, index=config.index, nprobe=config.nprobe)
    _, comp = connected_components(graph, directed=False)
    return relabel(comp)


def neighbour_distances(vectors: np.ndarray, config: ClusterConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every face's ``k`` nearest neighbours: (cosine distances (N, k) ascending, indices (N, k)).

    Missing neighbours (an approximate index that found fewer) have index -1 and distance inf.
    """

    n = vectors.shape[0]
    sims, idx = knn(vectors, min(config.k, n - 1), index=config.index, nprobe=config.nprobe)
    dist = 1.0 - sims.astype(np.float64)
    dist[idx < 0] = np.inf
    return dist, idx


def _edges(dist: np.ndarray, idx: np.ndarray, inside: np.ndarray):
    n = idx.shape[0]
    rows = np.repeat(np.arange(n), idx.shape[1])[inside.ravel()]
    return rows, idx[inside], dist[inside]


def average(vectors: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """Average linkage on the sparse k-NN graph: two groups merge only when their faces are close
    *on average*, so a single false edge (or a chain of them) cannot join two identities."""
    n = vectors.shape[0]
    if n < 2:
        return relabel(np.arange(n))
    threshold = float(config.resolved("threshold", config.threshold))
    radius = min(1.0, config.graph_factor * threshold)
    dist, idx = neighbour_distances(vectors, config)
    rows, cols, d = _edges(dist, idx, (idx >= 0) & (dist < radius))
    comp = average_linkage_graph(n, rows, cols, d, threshold, radius)
    return relabel(comp)


def impostor_radii(dist: np.ndarray, config: ClusterConfig) -> tuple[np.ndarray, Any]:
    """Per-face same-identity radius from the set's own impostor model (capped by ``threshold``
    when one is given) and the model."""

    model = fit_impostor_model(dist, rank_start=config.rank_start)
    max_false_merge = float(config.resolved("max_false_merge", config.max_false_merge))
    radius = model.radii(model.cut(dist, max_false_merge), config.density)
    if config.threshold is not None:
        radius = np.minimum(radius, config.threshold)
    return radius, model


def impostor_clusters(
    vectors: np.ndarray, config: ClusterConfig, attach: bool = True, counts: dict | None = None
) -> tuple[np.ndarray, np.ndarray, Any]:
    """:func:`impostor` with its per-face radii and the fitted model: (labels, radius, model).

    ``attach=False`` stops after the linkage (``impostor_linkage``): no second pass. ``counts``,
    when given, receives what the second pass did (``fragments_merged``, ``lone_faces_joined``).
    """
    n = vectors.shape[0]
    if n < 2:
        return relabel(np.arange(n)), np.full(n, np.inf), None
    dist, idx = neighbour_distances(vectors, config)
    radius, model = impostor_radii(dist, config)
    norm = dist / np.sqrt(radius[:, None] * radius[np.maximum(idx, 0)])
    rows, cols, d = _edges(norm, idx, (idx >= 0) & (norm < config.graph_factor))
    comp = average_linkage_graph(n, rows, cols, d, 1.0, config.graph_factor)
    if attach:
        linked = np.unique(comp).size
        comp = merge_fragments(comp, rows, cols, d, config.graph_factor, config.second_pass)
        merged = np.unique(comp).size
        comp = attach_lone_faces(comp, idx, norm, config.graph_factor, config.second_pass)
        if counts is not None:
            counts["fragments_merged"] = int(linked - merged)
            counts["lone_faces_joined"] = int(merged - np.unique(comp).size)
    return relabel(comp), radius, model


def impostor(vectors: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """Average linkage on distances measured in units of each pair's same-identity radius.

    The cut comes from the set's impostor model (:mod:`refface.mining.impostor`): the largest
    distance at which the strangers it expects make up at most ``max_false_merge`` of the k-NN
    pairs found within it. Each face's radius is that cut scaled by its own impostor scale
    (power ``density``); a pair's distance is divided by the geometric mean of its two radii, and
    groups merge while that mean normalized distance stays below 1. The cut tightens as the pool
    grows (strangers crowd in) and reaches further where people hold many photos, and crowded
    regions of the embedding (many look-alikes) get tighter radii than empty ones.

    A second pass (:mod:`refface.mining.attach`) then merges clusters that are one person's
    fragments (close for their own spread) and lets a lone face join the cluster its neighbours
    agree on: its nearest neighbours all in that cluster, and most of the cluster's members
    holding it among their nearest (a person's unusual photos, which the linkage's cut leaves
    just outside).
    """
    return impostor_clusters(vectors, config)[0]


def impostor_linkage(vectors: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """:func:`impostor` without the second pass: the radius-normalized average linkage alone."""
    return impostor_clusters(vectors, config, attach=False)[0]


def _threshold_edges(vectors: np.ndarray, config: ClusterConfig):
    dist, idx = neighbour_distances(vectors, config)
    return _edges(dist, idx, (idx >= 0) & (dist < config.threshold))


def chinese_whispers(vectors: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """Chinese whispers on the k-NN graph of pairs closer than the threshold, weighted by similarity
    (dlib's face-clustering example, on a sparse graph)."""

    n = vectors.shape[0]
    if n < 2:
        return relabel(np.arange(n))
    rows, cols, d = _threshold_edges(vectors, config)
    return relabel(communities.chinese_whispers(n, rows, cols, 1.0 - d))


def infomap(vectors: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """Infomap on the k-NN graph of pairs closer than the threshold, weighted by similarity."""

    n = vectors.shape[0]
    if n < 2:
        return relabel(np.arange(n))
    rows, cols, d = _threshold_edges(vectors, config)
    return relabel(communities.infomap(n, rows, cols, 1.0 - d))


# Methods whose cut comes from the set itself: a threshold, when given, only caps it.
ADAPTIVE = ("impostor", "impostor_linkage")
CLUSTERERS: dict[str, Callable[[np.ndarray, ClusterConfig], np.ndarray]] = {
    "impostor": impostor,
    "impostor_linkage": impostor_linkage,
    "average": average,
    "components": components,
    # ReF-LDM's pairwise rule by name: components at the ArcFace cut 0.4 unless a threshold is given.
    "refldm": components,
    "chinese_whispers": chinese_whispers,
    "infomap": infomap,
}


def model_family(emb: Any) -> str:
    """``dlib``, ``arcface`` or ``other`` from an ``Embeddings``' model name (bare arrays: ``other``)."""
    model = str(getattr(emb, "model", "") or "")
    if model.startswith("dlib"):
        return "dlib"
    if model.startswith("arcface"):
        return "arcface"
    return "other"


def default_threshold(emb: Any, method: str) -> float:
    """The cosine-distance threshold used when none is given (fixed-cut methods).

    ``components`` uses the embeddings' pairwise ``identity_threshold`` (ReF-LDM's rule);
    ``average`` uses the model's measured cut from ``AVERAGE_THRESHOLDS`` when listed. Bare
    arrays fall back to ArcFace's 0.4.
    """
    return model_threshold(
        getattr(emb, "model", None),
        getattr(emb, "identity_threshold", None),
        getattr(emb, "metric", "cosine"),
        method,
    )


def model_threshold(model: str | None, identity_threshold: float | None, metric: str, method: str) -> float:
    """:func:`default_threshold` from the facts an embeddings file records (model name, its pairwise
    identity threshold and metric)."""
    if method == "average" and model in AVERAGE_THRESHOLDS:
        return AVERAGE_THRESHOLDS[model]
    if identity_threshold is None:
        return ARCFACE_THRESHOLD
    return cosine_threshold(identity_threshold, metric)


def min_impostor_pool(config: ClusterConfig) -> int:
    """Fewest faces the impostor model can be fitted on: every face needs neighbours past its own
    identity's photos (ranks ``rank_start`` onwards) to count strangers with."""
    return config.rank_start + MIN_FIT_RANKS


def resolve_config(emb: Any, config: ClusterConfig | None = None, faces: int | None = None) -> ClusterConfig:
    """Fill what ``config`` leaves open from the embedding model's defaults (``MODEL_DEFAULTS``):
    the method and, for fixed-cut methods, the threshold. The result is validated.

    A pool of ``faces`` too small to fit the impostor model on (:func:`min_impostor_pool`) is
    clustered by average linkage at the model's measured cut instead: with no strangers to count,
    an adaptive cut would call every pair a stranger.
    """
    config = config or ClusterConfig()
    defaults = MODEL_DEFAULTS.get(model_family(emb), MODEL_DEFAULTS["other"])
    if config.method is None:
        config = replace(config, method=defaults["method"])
    if config.method in ADAPTIVE and faces is not None and faces < min_impostor_pool(config):
        log.info(
            "%d faces are too few for the impostor model (needs %d): average linkage at the "
            "embedding model's cut",
            faces,
            min_impostor_pool(config),
        )
        config = replace(config, method="average")
    if config.method in ADAPTIVE and config.max_false_merge is None:
        config = replace(config, max_false_merge=defaults.get("max_false_merge", MAX_FALSE_MERGE))
    if config.method == "refldm" and config.threshold is None:
        config = replace(config, threshold=ARCFACE_THRESHOLD)
    if config.method in CLUSTERERS and config.method not in ADAPTIVE and config.threshold is None:
        config = replace(config, threshold=default_threshold(emb, config.method))
    if config.threshold is not None:
        config = replace(config, threshold=float(config.threshold))
    return config.validate()


def _vectors(emb_or_vectors: Any) -> np.ndarray:
    vectors = getattr(emb_or_vectors, "vectors", emb_or_vectors)
    vectors = np.ascontiguousarray(np.asarray(vectors), dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"expected (N, D) vectors, got shape {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1)
    if not np.isfinite(norms).all() or (norms == 0).any():
        bad = int((~np.isfinite(norms) | (norms == 0)).sum())
        raise ValueError(f"{bad} embedding rows are zero, NaN or infinite; re-embed those faces")
    if np.abs(norms - 1).max(initial=0) > 1e-3:
        # Distances are cosine distances: unit-normalize raw vectors rather than mis-threshold them.
        vectors = vectors / norms[:, None]
    return vectors


@dataclass
class Clustering:
    """What a clustering run gives: labels, each face's same-identity radius (the bar its
    references must meet), the impostor model's per-face scale (NaN for fixed-cut methods) and a
    JSON-able summary."""

    labels: np.ndarray
    radius: np.ndarray
    scale: np.ndarray
    info: dict


def run_clustering(vectors: np.ndarray, config: ClusterConfig) -> Clustering:
    """Cluster with a resolved config (see :func:`resolve_config`).

    Fixed-cut methods give every face the threshold as its radius; ``impostor`` gives each face
    its own, and the summary carries the fitted impostor model.
    """
    n = vectors.shape[0]
    if n == 0:
        empty = np.empty(0)
        return Clustering(np.empty(0, dtype=np.int64), empty, empty, {})
    if config.method in ADAPTIVE:
        second_pass: dict = {}
        labels, radius, model = impostor_clusters(
            vectors, config, attach=config.method == "impostor", counts=second_pass
        )
        info: dict = {"second_pass": second_pass} if second_pass else {}
        scale = np.full(n, np.nan)
        if model is not None:
            info["impostor_model"] = model.summary()
            scale = model.scale
        if np.isfinite(radius).any():
            info["radius_median"] = round(float(np.median(radius[np.isfinite(radius)])), 5)
        return Clustering(labels, radius, scale, info)
    labels = CLUSTERERS[str(config.resolved("method", config.method))](vectors, config)
    threshold = float(config.resolved("threshold", config.threshold))
    return Clustering(labels, np.full(n, threshold), np.full(n, np.nan), {})


def cluster_and_radius(
    emb_or_vectors: Any,
    method: str | None = None,
    threshold: float | None = None,
    config: ClusterConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cluster` and each face's same-identity radius (the bar its references must meet)."""
    vectors = _vectors(emb_or_vectors)
    cfg = config or ClusterConfig()
    if method is not None:
        cfg = replace(cfg, method=method)
    if threshold is not None:
        cfg = replace(cfg, threshold=threshold)
    result = run_clustering(vectors, resolve_config(emb_or_vectors, cfg, faces=len(vectors)))
    return result.labels, result.radius


def cluster(
    emb_or_vectors: Any,
    method: str | None = None,
    threshold: float | None = None,
    config: ClusterConfig | None = None,
) -> np.ndarray:
    """Cluster faces into identities.

    Args:
        emb_or_vectors: an ``Embeddings`` (its model picks the default method, its
            ``identity_threshold`` and ``metric`` the fixed-cut thresholds) or an (N, D) array of
            unit vectors.
        method: a key of ``CLUSTERERS``; None = the model's default (``MODEL_DEFAULTS``).
        threshold: cosine distance; None uses :func:`default_threshold` (fixed-cut methods) or
            no cap (``impostor``).
        config: further settings (k, graph_factor, index, max_false_merge); its method/threshold
            are overridden by the explicit arguments.

    Returns:
        (N,) int64 labels: clusters of two or more faces are numbered 0.. by size, largest
        first; a face alone is ``-1`` (a first-class singleton, not noise).
    """
    return cluster_and_radius(emb_or_vectors, method, threshold, config)[0]


def identities_frame(
    paths, labels: np.ndarray, radius: np.ndarray | None = None, scale: np.ndarray | None = None
):
    """The ``identities.parquet`` table: path, identity (-1 = singleton), cluster_size and, when
    given, each face's same-identity radius and impostor-model scale."""
    import pandas as pd

    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.ones(labels.size, dtype=np.int64)
    multi = labels >= 0
    if multi.any():
        sizes[multi] = np.bincount(labels[multi])[labels[multi]]
    frame = pd.DataFrame({"path": [str(p) for p in paths], "identity": labels, "cluster_size": sizes})
    if radius is not None:
        frame["radius"] = np.asarray(radius, dtype=np.float64)
    if scale is not None:
        frame["impostor_scale"] = np.asarray(scale, dtype=np.float64)
    return frame


def cluster_root(
    root: str | Path, config: ClusterConfig | None = None, force: bool = False
) -> tuple[dict, bool]:
    """Stage ``identities``: cluster a dataset root's embeddings into ``identities.parquet``.

    Skipped when the embeddings and the config are unchanged. Returns (manifest, ran); the
    manifest carries the cluster counts and, for ``impostor``, the fitted model.
    """

    root = Path(root)
    emb = load_embeddings(root)
    resolved = resolve_config(emb, config, faces=len(emb.paths))
    inputs = {
        "embeddings_fingerprint": getattr(emb, "fingerprint", None),
        # size + mtime, not a content hash: a 10M x 512 embeddings file would take minutes to hash.
        "embeddings_files": folder_fingerprint(root, [*embeddings_files(root), "embeddings.parquet"]),
        "stage_version": STAGE_VERSION,
    }

    def work() -> dict:
        result = run_clustering(_vectors(emb), resolved)
        labels, info = result.labels, result.info
        df = identities_frame(emb.paths, labels, result.radius, result.scale)
        write_parquet(root / IDENTITIES, df)
        n_clusters = int(labels.max() + 1) if labels.size and labels.max() >= 0 else 0
        return {
            "outputs": ["identities.parquet"],
            "counts": {
                "faces": int(labels.size),
                "clusters": n_clusters,
                "clustered_faces": int((labels >= 0).sum()),
                "singletons": int((labels < 0).sum()),
                "largest_cluster": int(df["cluster_size"].max()) if len(df) else 0,
            },
            **info,
        }

    return run_stage(root, STAGE, resolved, inputs, work, force=force)
