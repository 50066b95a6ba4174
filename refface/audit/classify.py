"""Thresholds of an audit and the classification of one pair of sets: gather candidate image pairs,
label each exact / near-duplicate / same-identity, count the leak statistics."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from refface.audit.config import LEAK_KINDS, AuditConfig, AuditSet, PairResult, Thresholds, dot_to_distance
from refface.audit.search import embedding_pairs, hash_pairs, same_cluster_pairs, shared_label_pairs
from refface.manifests.layout import IDENTITIES
from refface.mining.cluster import DEFAULT_METHOD, cosine_threshold, model_threshold
from refface.mining.references import NEAR_DUPLICATE_RATIO


def resolve_thresholds(model: dict, config: AuditConfig) -> Thresholds:
    """Thresholds from the config, falling back to what the embeddings record."""
    metric = str(model.get("metric") or "cosine")
    identity = config.identity_threshold
    if identity is None:
        identity = model.get("identity_threshold")
    if identity is None:
        raise ValueError(
            "no identity threshold: the embeddings record none; pass --identity-threshold "
            "(a distance in the embedder's metric, e.g. 0.4 cosine for ArcFace)"
        )
    near = config.near_dup_threshold
    if near is None:
        near = NEAR_DUPLICATE_RATIO * float(identity)
    if near > identity:
        raise ValueError(f"near-duplicate bar {near} is looser than the identity bar {identity}; lower it")
    rule = config.identity_rule
    method, cut = "", 0.0
    if rule == "cluster":
        method = DEFAULT_METHOD
        if config.identity_threshold is not None:
            cut = cosine_threshold(float(identity), metric)
        else:
            # The builder's cut for this model (average linkage has its own measured cut per model).
            cut = model_threshold(model.get("model"), float(identity), metric, method)
    return Thresholds(
        metric, float(identity), float(near), int(config.phash_distance), rule, method, float(cut)
    )


def _image_level(a: AuditSet, b: AuditSet, rows, cols, sims) -> pd.DataFrame:
    df = pd.DataFrame({"ia": a.owner[rows], "ib": b.owner[cols], "similarity": sims.astype(np.float64)})
    if df.empty:
        return df
    return df.groupby(["ia", "ib"], as_index=False)["similarity"].max()


def _pair_similarity(a: AuditSet, b: AuditSet, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Best face-to-face inner product of each image pair; NaN where either image has no face."""
    out = np.full(len(ia), np.nan)
    if len(ia) == 0:
        return out
    faces_a = pd.Series(range(len(a.owner))).groupby(a.owner).apply(list).to_dict()
    faces_b = pd.Series(range(len(b.owner))).groupby(b.owner).apply(list).to_dict()
    for n, (x, y) in enumerate(zip(ia, ib, strict=True)):
        fa, fb = faces_a.get(int(x)), faces_b.get(int(y))
        if fa and fb:
            out[n] = float((a.vectors[fa] @ b.vectors[fb].T).max())
    return out


def audit_pair(a: AuditSet, b: AuditSet, th: Thresholds, config: AuditConfig) -> PairResult:
    """Find and classify every leaked image pair between sets ``a`` and ``b``."""
    cand, clustered, exact, close, nearest, stats = gather_candidates(a, b, th, config)
    leaks, rejected = classify_candidates(a, b, cand, clustered, exact, close, th)
    out = pair_stats(a, b, leaks, th, rejected)
    out["identities_from"] = stats["identities_from"]
    out["timings"] = stats["timings"]
    return PairResult(a.name, b.name, leaks, nearest, out)


def gather_candidates(
    a: AuditSet, b: AuditSet, th: Thresholds, config: AuditConfig
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, np.ndarray, dict]:
    """Every image pair between ``a`` and ``b`` that any search finds.

    Returns:
        (candidates ``ia, ib, similarity``, pairs the identity clustering joins, exact hash pairs,
        perceptually close pairs, nearest cross similarity of each query face, ``{"timings",
        "identities_from"}``).
    """
    timings = {}
    start = time.perf_counter()
    # FAISS indexes the larger set and queries the smaller one.
    swap = len(a.vectors) > len(b.vectors)
    q, base = (b, a) if swap else (a, b)
    # Under the cluster rule this search feeds the histogram; its bar keeps the pair list short.
    bar = th.identity_dot if th.rule == "pair" else th.near_duplicate_dot
    rows, cols, sims, nearest = embedding_pairs(q.vectors, base.vectors, bar, config.index)
    if swap:
        rows, cols = cols, rows
    emb = _image_level(a, b, rows, cols, sims)
    timings["embedding_search_s"] = round(time.perf_counter() - start, 4)
    clustered = pd.DataFrame({"ia": [], "ib": [], "similarity": []})
    identity_source = "pairs under the identity bar"
    if th.rule == "cluster":
        start = time.perf_counter()
        if a.root is not None and a.root == b.root and a.identity is not None and b.identity is not None:
            # Both sets come from one dataset root whose identities the builder already clustered.
            fa, fb, fs = shared_label_pairs(a.vectors, b.vectors, a.identity, b.identity)
            identity_source = f"{a.root}/{IDENTITIES}"
        else:
            fa, fb, fs = same_cluster_pairs(a.vectors, b.vectors, th, config.index)
            identity_source = f"{th.cluster_method} clustering of both sets"
        clustered = _image_level(a, b, fa, fb, fs)
        emb = pd.concat([emb, clustered], ignore_index=True)
        if len(emb):
            emb = emb.groupby(["ia", "ib"], as_index=False)["similarity"].max()
        timings["identity_clustering_s"] = round(time.perf_counter() - start, 4)

    start = time.perf_counter()
    exact, close = hash_pairs(a, b, th.phash_distance)
    timings["hash_search_s"] = round(time.perf_counter() - start, 4)

    cand = pd.concat(
        [emb[["ia", "ib"]] if len(emb) else None, exact, close[["ia", "ib"]] if len(close) else None],
        ignore_index=True,
    )
    cand = (
        cand.drop_duplicates().astype(np.int64)
        if len(cand)
        else pd.DataFrame({"ia": [], "ib": []}, dtype=np.int64)
    )
    cand = cand.merge(emb, on=["ia", "ib"], how="left")
    missing = cand["similarity"].isna().to_numpy()
    if missing.any():
        # Pairs found only by hashes: compare their faces directly (few pairs, exact numbers).
        ia, ib = cand.loc[missing, "ia"].to_numpy(), cand.loc[missing, "ib"].to_numpy()
        cand.loc[missing, "similarity"] = _pair_similarity(a, b, ia, ib)
    return cand, clustered, exact, close, nearest, {"timings": timings, "identities_from": identity_source}


def classify_candidates(
    a: AuditSet,
    b: AuditSet,
    cand: pd.DataFrame,
    clustered: pd.DataFrame,
    exact: pd.DataFrame,
    close: pd.DataFrame,
    th: Thresholds,
) -> tuple[pd.DataFrame, int]:
    """Label each candidate pair with the strongest :data:`LEAK_KINDS` kind that holds.

    Returns:
        (the leaks, image-level and sorted strongest kind first, most similar first; the number of
        hash matches that were not near-duplicates).
    """
    cand = cand.merge(close, on=["ia", "ib"], how="left")
    exact_set = set(zip(exact["ia"].tolist(), exact["ib"].tolist(), strict=True))
    is_exact = np.array(
        [(x, y) in exact_set for x, y in zip(cand["ia"], cand["ib"], strict=True)], dtype=bool
    )
    sim = cand["similarity"].to_numpy(np.float64)
    has_face = ~np.isnan(sim)
    hash_close = cand["phash_distance"].notna().to_numpy()
    pair_rule = has_face & (sim > th.identity_dot)
    if th.rule == "cluster":
        in_cluster = set(
            zip(clustered["ia"].astype(int).tolist(), clustered["ib"].astype(int).tolist(), strict=True)
        )
        same_id = np.array(
            [(x, y) in in_cluster for x, y in zip(cand["ia"], cand["ib"], strict=True)], dtype=bool
        )
    else:
        same_id = pair_rule
    # Near-duplicate = the picture hashes alike AND the faces agree within the near-duplicate bar
    # (or there is no face to compare); either test alone misfires (see AuditConfig).
    near = hash_close & (~has_face | (sim > th.near_duplicate_dot))
    kind = np.where(
        is_exact, "exact", np.where(near, "near_duplicate", np.where(same_id, "same_identity", ""))
    )
    rejected = int((hash_close & ~is_exact & ~near).sum())
    cand["kind"] = kind
    leaks = cand[cand["kind"] != ""].copy()
    leaks["distance"] = dot_to_distance(leaks["similarity"].to_numpy(np.float64), th.metric)
    leaks["phash_distance"] = leaks["phash_distance"].fillna(-1).astype(np.int64)
    leaks["mirrored"] = leaks["mirrored"].to_numpy(dtype=float, na_value=0.0) > 0
    order = pd.Categorical(leaks["kind"], categories=list(LEAK_KINDS), ordered=True)
    leaks = (
        leaks.assign(_k=order.codes, _s=-leaks["similarity"].fillna(2.0))
        .sort_values(["_k", "_s", "ia", "ib"])
        .drop(columns=["_k", "_s"])
        .reset_index(drop=True)
    )
    return leaks, rejected


def count_components(edges_a: np.ndarray, edges_b: np.ndarray) -> int:
    """Connected components of the bipartite leak graph: each one is a person seen on both sides."""
    if len(edges_a) == 0:
        return 0
    ua, ia = np.unique(edges_a, return_inverse=True)
    ub, ib = np.unique(edges_b, return_inverse=True)
    n = len(ua) + len(ub)
    g = coo_matrix((np.ones(len(ia)), (ia, ib + len(ua))), shape=(n, n))
    return int(connected_components(g, directed=False)[0])


def thresholds_dict(th: Thresholds) -> dict:
    out = {
        "identity_rule": th.rule,
        "metric": th.metric,
        "identity_distance": th.identity,
        "near_duplicate_distance": th.near_duplicate,
        "phash_distance": th.phash_distance,
    }
    if th.rule == "cluster":
        out["cluster_method"] = th.cluster_method
        out["cluster_cosine_distance"] = th.cluster_threshold
    return out


def pair_stats(a: AuditSet, b: AuditSet, leaks: pd.DataFrame, th: Thresholds, rejected: int) -> dict:
    la = leaks["ia"].nunique() if len(leaks) else 0
    lb = leaks["ib"].nunique() if len(leaks) else 0
    rate_a = la / a.n_images if a.n_images else 0.0
    rate_b = lb / b.n_images if b.n_images else 0.0
    by_kind = {k: int((leaks["kind"] == k).sum()) for k in LEAK_KINDS}
    return {
        "sets": [a.name, b.name],
        "images": {a.name: a.n_images, b.name: b.n_images},
        "faces": {a.name: len(a.vectors), b.name: len(b.vectors)},
        "leaked_images": {a.name: int(la), b.name: int(lb)},
        "leak_rates": {a.name: rate_a, b.name: rate_b},
        # The gate reads the worse side: a small test set fully contained in train is a 100% leak.
        "leak_rate": max(rate_a, rate_b),
        "leaked_identities": count_components(leaks["ia"].to_numpy(), leaks["ib"].to_numpy())
        if len(leaks)
        else 0,
        "leaked_pairs": int(len(leaks)),
        "pairs_by_kind": by_kind,
        "phash_matches_not_near_duplicates": rejected,
        "thresholds": thresholds_dict(th),
    }
