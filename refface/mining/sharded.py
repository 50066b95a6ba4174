"""Sharded embeddings with a memory-mapped reader, and k-NN graphs and clusters at 10M+ faces.

Layout of a sharded embeddings folder (``<root>/embeddings_shards/`` by default)::

    shard-000000.npy        float32 (rows, D), L2-normalized; one file per chunk/partition
    shard-000000.parquet    row (global), image_id, path           (optional)
    index.json              version, dim, count, shards [{name, start, rows}], model metadata

``index.json`` is written last: a folder is valid only once it exists. Readers memory-map the
shards, so 10M x 512 (20 GB) never has to fit in one process.

A sharded k-NN search (:func:`sharded_knn`) builds one index over every shard (chosen by size and
memory: exact below ~1M vectors, IVF-Flat or IVF-PQ above, trained on a sample, on GPU when FAISS
sees one), then searches shard by shard, writing ``knn-<shard>.npz`` atomically per query shard so
a killed run resumes per shard. Its recall against exact search is measured on a held-out sample
and written into ``knn.json``. :func:`cluster_edges` clusters the resulting sparse graph without
any dense matrix.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHARDS_VERSION = 1
KNN_VERSION = 1
INDEX_FILE = "index.json"
DEFAULT_FOLDER = "embeddings_shards"
# Below this many vectors exact search is affordable (and needs no training).
FLAT_MAX = 1_000_000
INDEX_KINDS = ("flat", "ivf_flat", "ivf_pq")
# Share of the memory budget one index may take.
INDEX_MEMORY_SHARE = 0.5


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


# ------------------------------------------------------------------------------------ writing
def write_shard(
    folder: str | os.PathLike,
    i: int,
    vectors: np.ndarray,
    paths: list[str] | None = None,
    image_ids: list[int] | np.ndarray | None = None,
) -> str:
    """Write shard ``i`` (vectors, and a table when ``paths`` is given) atomically; returns its name.

    The table's ``row`` column is filled in by :func:`finish_shards`, which knows each shard's offset.
    """
    import pandas as pd

    from refface.manifests.atomic import write_npy, write_parquet

    folder = Path(folder)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise ValueError(f"a shard holds (rows, dim) vectors, got shape {vectors.shape}")
    name = shard_name(i)
    if paths is not None:
        if len(paths) != len(vectors):
            raise ValueError(f"shard {i}: {len(paths)} paths for {len(vectors)} vectors")
        ids = np.full(len(paths), -1, np.int64) if image_ids is None else np.asarray(image_ids, np.int64)
        write_parquet(folder / f"{name}.parquet", pd.DataFrame({"image_id": ids, "path": list(paths)}))
    write_npy(folder / f"{name}.npy", vectors)
    return name


def finish_shards(folder: str | os.PathLike, meta: dict | None = None, checksums: bool = True) -> dict:
    """Write ``index.json`` over every ``shard-*.npy`` in the folder (last: it marks the folder valid).

    Shards must be numbered 0..S-1 without gaps and share one dimension. With ``checksums`` each
    shard's entry carries the sha256 of its file, so the index digests the vectors' content.
    """
    from refface.manifests.atomic import sha256_file, write_json

    folder = Path(folder)
    files = sorted(folder.glob("shard-*.npy"))
    numbers = [int(f.stem.split("-")[1]) for f in files]
    if numbers != list(range(len(files))):
        missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
        raise ValueError(f"{folder}: shards must be numbered 0..{len(files) - 1}; missing {missing[:5]}")
    shards, start, dim = [], 0, None
    for f in files:
        mm = np.load(f, mmap_mode="r")
        if dim is None:
            dim = int(mm.shape[1])
        elif mm.shape[1] != dim:
            raise ValueError(f"{f} has dim {mm.shape[1]}, other shards {dim}")
        entry = {"name": f.stem, "start": start, "rows": int(mm.shape[0])}
        if checksums:
            entry["sha256"] = sha256_file(f)
        shards.append(entry)
        start += int(mm.shape[0])
    index = {
        "version": SHARDS_VERSION,
        "dim": int(dim or 0),
        "count": start,
        "shards": shards,
        "has_tables": all((folder / f"{s['name']}.parquet").exists() for s in shards) and bool(shards),
        **(meta or {}),
    }
    write_json(folder / INDEX_FILE, index)
    return index


def shard_embeddings(
    root: str | os.PathLike, out: str | os.PathLike | None = None, rows_per_shard: int = 1_000_000
) -> ShardedEmbeddings:
    """Split a dataset root's ``embeddings.npy``/``.parquet`` into shards (read memory-mapped).

    Args:
        root: dataset root written by ``refface embed``.
        out: shards folder; default ``<root>/embeddings_shards``.
        rows_per_shard: vectors per shard file.

    Returns:
        The reader over the new folder. Shards already written are kept (the split is resumable).
    """
    import pandas as pd

    root = Path(root)
    out = Path(out) if out else root / DEFAULT_FOLDER
    if rows_per_shard < 1:
        raise ValueError("rows_per_shard must be at least 1")
    meta_path = root / "embeddings.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found; run `refface embed IMAGES --out {root}` first")
    meta = json.loads(meta_path.read_text())
    if meta.get("layout") == "sharded":
        # Mined with `refface embed --shard-rows`: the shards are already there.
        existing = root / meta["shards"]
        if out.resolve() != existing.resolve():
            raise ValueError(f"{root} already holds sharded embeddings in {existing}; read that folder")
        return ShardedEmbeddings(existing)
    vectors = np.load(root / "embeddings.npy", mmap_mode="r")
    table = pd.read_parquet(root / "embeddings.parquet", columns=["image_id", "path"])
    if len(table) != len(vectors):
        raise ValueError(f"{root}: embeddings.npy has {len(vectors)} rows, embeddings.parquet {len(table)}")
    for s, start in enumerate(range(0, len(vectors), rows_per_shard)):
        if (out / f"{shard_name(s)}.npy").exists():
            continue
        stop = min(len(vectors), start + rows_per_shard)
        part = table.iloc[start:stop]
        write_shard(
            out, s, vectors[start:stop], part["path"].astype(str).tolist(), part["image_id"].to_numpy()
        )
    keep = ("model", "fingerprint", "metric", "identity_threshold")
    finish_shards(out, {k: meta[k] for k in keep if k in meta})
    return ShardedEmbeddings(out)


# ------------------------------------------------------------------------------------ reading
class ShardedEmbeddings:
    """Memory-mapped reader over a sharded embeddings folder (global row ids across shards)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / INDEX_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: the shards folder is incomplete (index.json is written last)"
            )
        self.meta = json.loads(path.read_text())
        if self.meta.get("version") != SHARDS_VERSION:
            raise ValueError(
                f"{path} has version {self.meta.get('version')}, this refface reads {SHARDS_VERSION}"
            )
        self.shards: list[dict] = self.meta["shards"]
        self.starts = np.array([s["start"] for s in self.shards], dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def shard(self, s: int) -> np.ndarray:
        """Shard ``s`` as a read-only memory map (rows, dim)."""
        if s not in self._maps:
            mm = np.load(self.folder / f"{self.shards[s]['name']}.npy", mmap_mode="r")
            if mm.shape != (self.shards[s]["rows"], self.dim):
                raise ValueError(
                    f"{self.shards[s]['name']}.npy has shape {mm.shape}, index.json says otherwise"
                )
            self._maps[s] = mm
        return self._maps[s]

    def iter_shards(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(shard, start_row, memmap)`` in order."""
        for s, info in enumerate(self.shards):
            yield s, int(info["start"]), self.shard(s)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (global, any order, repeats allowed) as one float32 array."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids must be in [0, {len(self)})")
        out = np.empty((ids.size, self.dim), dtype=np.float32)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        for s in np.unique(which):
            mask = which == s
            local = ids[mask] - self.starts[s]
            # Sorted reads walk the file forwards; put rows back in the caller's order after.
            order = np.argsort(local, kind="stable")
            rows = np.asarray(self.shard(int(s))[local[order]])
            dest = np.flatnonzero(mask)[order]
            out[dest] = rows
        return out

    def dot(self, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """``row(ids[j]) . vectors[j]`` for every j: exact scores of candidate pairs.

        Rows are read in ascending id order, shard by shard (the memory map is walked forwards and
        nothing is scattered back), and each score goes to its pair's place at the end: twice as
        fast as :meth:`take` followed by a row-wise product.
        """
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids must be in [0, {len(self)})")
        if not ids.size:
            return np.empty(0, np.float32)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        which = np.searchsorted(self.starts, sorted_ids, side="right") - 1
        cuts = np.flatnonzero(np.diff(which)) + 1
        scores = np.empty(ids.size, np.float32)
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, ids.size], strict=True):
            s = int(which[lo])
            rows = self.shard(s)[sorted_ids[lo:hi] - self.starts[s]]
            scores[lo:hi] = np.einsum("cd,cd->c", rows, vectors[order[lo:hi]])
        out = np.empty(ids.size, np.float32)
        out[order] = scores
        return out

    def paths(self) -> list[str]:
        """Every row's path (reads the shard tables; ValueError when the folder has none)."""
        import pandas as pd

        if not self.meta.get("has_tables"):
            raise ValueError(f"{self.folder} holds vectors only (no shard tables with paths)")
        out: list[str] = []
        for info in self.shards:
            out += pd.read_parquet(self.folder / f"{info['name']}.parquet", columns=["path"])["path"].tolist()
        return out


# ------------------------------------------------------------------------------ index choice
@dataclass
class IndexPlan:
    """Which FAISS index a sharded search builds, and why.

    Attributes:
        kind: ``flat`` (exact), ``ivf_flat`` (IVF lists of full vectors) or ``ivf_pq`` (IVF lists of
            product-quantized codes; candidates re-ranked with exact vectors read from the shards).
        nlist: IVF lists.
        nprobe: lists visited per query.
        pq_m: PQ sub-quantizers (bytes per vector at 8 bits, half that with 4-bit fast scan).
        pq_bits: bits per sub-quantizer code (4 = CPU fast scan, 8 on GPU).
        rerank: ``ivf_pq`` fetches ``rerank * k`` candidates and keeps the best ``k`` by exact score.
        train_size: vectors sampled to train the quantizers.
        gpu: build on GPU.
        index_bytes: estimated resident size of the index.
        reason: the rule that picked ``kind``.
    """

    kind: str
    nlist: int = 0
    nprobe: int = 0
    pq_m: int = 0
    pq_bits: int = 0
    rerank: int = 1
    train_size: int = 0
    gpu: bool = False
    index_bytes: int = 0
    reason: str = ""


def index_bytes(kind: str, n: int, dim: int, nlist: int = 0, pq_m: int = 0, pq_bits: int = 8) -> int:
    """Resident bytes of an index: vectors or codes, 8-byte ids per IVF entry, the coarse centroids."""
    if kind == "flat":
        return n * dim * 4
    coarse = nlist * dim * 4
    if kind == "ivf_flat":
        return n * (dim * 4 + 8) + coarse
    if kind == "ivf_pq":
        return n * (math.ceil(pq_m * pq_bits / 8) + 8) + coarse + pq_m * (2**pq_bits) * (dim // pq_m) * 4
    raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")


def default_nlist(n: int) -> int:
    """IVF lists: the power of two nearest 2*sqrt(N), within [16, 262144] and at most N/39.

    FAISS's guideline is 4-16*sqrt(N); the low end keeps the coarse k-means and the per-query
    centroid scan (N * nlist * D flops in all) affordable on CPUs, and nprobe buys recall back.
    """
    target = 2 * math.sqrt(max(n, 1))
    lists = 2 ** round(math.log2(max(target, 1)))
    return int(max(1, min(max(16, lists), 262_144, max(1, n // 39))))


def available_memory() -> int:
    """Bytes of memory this machine has available now (total when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def plan_index(
    n: int,
    dim: int,
    kind: str = "auto",
    memory_bytes: int | None = None,
    gpu: bool | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_m: int | None = None,
    rerank: int = 4,
) -> IndexPlan:
    """Choose the index for ``n`` vectors of ``dim`` dimensions.

    Rules: exact (``flat``) below ``FLAT_MAX``; above it IVF-Flat when the full vectors fit in
    half the memory budget *and* a GPU scans them (on CPU an IVF-Flat scan costs nprobe/nlist * N * D
    flops per query, hours at 10M), else IVF-PQ (4-bit fast-scan codes on CPU, 8-bit on GPU) with
    exact re-ranking of ``rerank * k`` candidates from the memory-mapped shards.

    Args:
        n, dim: base size.
        kind: "auto" or one of ``INDEX_KINDS`` to force.
        memory_bytes: budget; default the memory available now.
        gpu: build on GPU; None = when a FAISS GPU build sees a GPU.
        nlist, nprobe, pq_m: override the defaults (``default_nlist``; nlist/128 at least 32; D/8).
        rerank: candidate factor of IVF-PQ.
    """
    from refface.mining.neighbors import gpu_available

    if n < 1 or dim < 1:
        raise ValueError(f"need at least one vector of positive dimension, got n={n}, dim={dim}")
    if kind != "auto" and kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose auto or one of {', '.join(INDEX_KINDS)}")
    if gpu is None:
        gpu = gpu_available()
    budget = int(memory_bytes if memory_bytes is not None else available_memory())
    lists = int(nlist or default_nlist(n))
    probe = int(nprobe or max(32, lists // 128))
    m = int(pq_m or max(1, dim // 8))
    if dim % m:
        raise ValueError(f"pq_m={m} must divide dim={dim}")
    bits = 8 if gpu else 4
    flat_ivf = index_bytes("ivf_flat", n, dim, lists)
    if kind == "auto":
        if n < FLAT_MAX:
            kind, reason = "flat", f"n={n:,} < {FLAT_MAX:,}: exact search"
        elif gpu and flat_ivf <= INDEX_MEMORY_SHARE * budget:
            kind, reason = (
                "ivf_flat",
                f"full vectors ({flat_ivf / 1e9:.1f} GB) fit the budget and a GPU scans them",
            )
        else:
            why = "no GPU to scan full vectors" if not gpu else f"full vectors need {flat_ivf / 1e9:.1f} GB"
            kind, reason = "ivf_pq", f"{why}: PQ codes + exact re-ranking from the shards"
    else:
        reason = "forced"
    if kind == "flat":
        return IndexPlan(kind, gpu=bool(gpu), index_bytes=index_bytes("flat", n, dim), reason=reason)
    # 39 points per list is FAISS's training floor; capped because k-means cost grows with it.
    train = int(min(n, max(39 * lists, 10_000), 1_000_000))
    size = index_bytes(kind, n, dim, lists, m, bits)
    return IndexPlan(
        kind,
        nlist=lists,
        nprobe=min(probe, lists),
        pq_m=m if kind == "ivf_pq" else 0,
        pq_bits=bits if kind == "ivf_pq" else 0,
        rerank=max(1, int(rerank)) if kind == "ivf_pq" else 1,
        train_size=train,
        gpu=bool(gpu),
        index_bytes=size,
        reason=reason,
    )


def _to_gpu(faiss, index, plan: IndexPlan):
    """Copy a CPU index to GPU 0; IVF-PQ with 64+ byte codes needs float16 lookup tables there."""
    res = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = plan.kind == "ivf_pq"
    gpu_index = faiss.index_cpu_to_gpu(res, 0, index, options)
    gpu_index.refface_resources = res  # resources must outlive the GPU index
    return gpu_index


def build_sharded_index(
    shards: ShardedEmbeddings, plan: IndexPlan, exclude: np.ndarray | None = None, seed: int = 0
):
    """Train (on a seeded sample that leaves out ``exclude``) and fill a FAISS index shard by shard."""
    from refface.mining.neighbors import _faiss

    faiss = _faiss()
    n, dim = len(shards), shards.dim
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        spec = f"IVF{plan.nlist},Flat" if plan.kind == "ivf_flat" else f"IVF{plan.nlist},PQ{plan.pq_m}"
        if plan.kind == "ivf_pq" and plan.pq_bits == 4:
            spec += "x4fs"
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = 10  # coarse k-means: 10 rounds settle the lists; 25 costs 2.5x for no recall
        pool = np.arange(n, dtype=np.int64)
        if exclude is not None and exclude.size:
            pool = np.setdiff1d(pool, exclude)
        rng = np.random.default_rng(seed)
        size = min(plan.train_size, pool.size)
        sample = np.sort(rng.choice(pool, size, replace=False))
        index.train(shards.take(sample))
        ivf.nprobe = plan.nprobe
    if plan.gpu:
        index = _to_gpu(faiss, index, plan)
    for _, _, mm in shards.iter_shards():
        for start in range(0, mm.shape[0], 262_144):
            index.add(np.ascontiguousarray(mm[start : start + 262_144], dtype=np.float32))
    return index


# ------------------------------------------------------------------------------ sharded search
@dataclass
class KnnResult:
    """A finished sharded k-NN search: per-shard part files plus ``knn.json``."""

    folder: Path
    n: int
    k: int
    plan: IndexPlan
    recall: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    shards_searched: int = 0

    def part(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities (rows, k) float32, neighbour ids (rows, k) int64) of query shard ``s``."""
        with np.load(self.folder / f"knn-{s:06d}.npz") as z:
            return z["sims"], z["idx"].astype(np.int64)

    def parts(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Yield ``(shard, start_row, sims, idx)`` for every query shard."""
        meta = json.loads((self.folder / "knn.json").read_text())
        for s, start in enumerate(meta["starts"]):
            sims, idx = self.part(s)
            yield s, int(start), sims, idx

    def edges(self, max_distance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Graph edges (rows, cols, cosine distance) closer than ``max_distance``, shard by shard."""
        rows, cols, dist = [], [], []
        for _, start, sims, idx in self.parts():
            d = 1.0 - sims.astype(np.float64)
            inside = (idx >= 0) & (d < max_distance)
            rows.append(np.repeat(np.arange(start, start + idx.shape[0], dtype=np.int64), inside.sum(axis=1)))
            cols.append(idx[inside])
            dist.append(d[inside])
        if not rows:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(dist)


def _search(
    index,
    plan: IndexPlan,
    shards: ShardedEmbeddings,
    query: np.ndarray,
    ids: np.ndarray,
    k: int,
):
    """k-NN of ``query`` rows (global ids ``ids``), self excluded; IVF-PQ candidates re-ranked exactly.

    Every IVF-PQ candidate is re-scored: 4-bit PQ scores rank well but are biased low (a
    same-person pair at cosine 0.77 scored 0.32), so no threshold can be applied to them.
    """
    fetch = k * plan.rerank + 1
    sims, idx = index.search(query, min(fetch, len(shards)))
    if plan.kind == "ivf_pq":
        # Exact scores of the candidates, read from the shards: PQ scores only rank candidates.
        q_rows, c_cols = np.nonzero(idx >= 0)
        # Limit memory: at most 65536 candidate vectors gathered at a time.
        for b in range(0, q_rows.size, 65_536):
            r, c = q_rows[b : b + 65_536], c_cols[b : b + 65_536]
            sims[r, c] = shards.dot(idx[r, c], query[r])
    sims = np.where(idx >= 0, sims, -np.inf).astype(np.float32)
    sims[idx == ids[:, None]] = -np.inf  # self
    idx = np.where(np.isfinite(sims), idx, -1)
    # Best k by score, ties by smaller id so every run and device orders them alike.
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    sims = np.take_along_axis(sims, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
    return sims, idx


def exact_knn(shards: ShardedEmbeddings, ids: np.ndarray, k: int, block: int = 262_144):
    """Exact k-NN of rows ``ids`` (self excluded): FAISS flat search block by block, merged."""
    from refface.mining.neighbors import _faiss

    faiss = _faiss()
    ids = np.asarray(ids, dtype=np.int64)
    query = shards.take(ids)
    best_s = np.full((len(ids), 0), -np.inf, np.float32)
    best_i = np.full((len(ids), 0), -1, np.int64)
    for _, start, mm in shards.iter_shards():
        for b in range(0, mm.shape[0], block):
            flat = faiss.IndexFlatIP(shards.dim)
            flat.add(np.ascontiguousarray(mm[b : b + block], dtype=np.float32))
            s, i = flat.search(query, min(k + 1, flat.ntotal))
            i = np.where(i >= 0, i + start + b, -1)
            s[(i == ids[:, None]) | (i < 0)] = -np.inf
            best_s = np.concatenate([best_s, s], axis=1)
            best_i = np.concatenate([best_i, i], axis=1)
            keep = np.lexsort((best_i, -best_s), axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, keep, axis=1)
            best_i = np.take_along_axis(best_i, keep, axis=1)
    best_i = np.where(np.isfinite(best_s), best_i, -1)
    return best_s, best_i


def graph_recall(
    approx_sims: np.ndarray,
    approx_idx: np.ndarray,
    exact_sims: np.ndarray,
    exact_idx: np.ndarray,
    radius: float,
) -> dict:
    """Recall@k of the approximate neighbour lists, and recall of the edges closer than ``radius``."""
    from refface.mining.neighbors import recall_at_k

    near = (exact_idx >= 0) & (1.0 - exact_sims < radius)
    found = (exact_idx[:, :, None] == approx_idx[:, None, :]).any(axis=2)
    return {
        "recall_at_k": round(recall_at_k(approx_idx, exact_idx), 5),
        "edge_recall": round(float(found[near].mean()) if near.any() else 1.0, 5),
        "edges_in_sample": int(near.sum()),
        "edge_radius": radius,
    }


def sharded_knn(
    shards: ShardedEmbeddings,
    out: str | os.PathLike,
    k: int = 32,
    kind: str = "auto",
    memory_bytes: int | None = None,
    gpu: bool | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_m: int | None = None,
    rerank: int = 4,
    recall_sample: int = 1000,
    recall_radius: float = 0.4,
    batch_size: int = 8192,
    seed: int = 0,
    save_index: bool = True,
) -> KnnResult:
    """k-NN graph of every row against all rows, built shard by shard and resumable per shard.

    Outputs in ``out``: ``knn-<shard>.npz`` per query shard (``sims`` float32, ``idx`` int32/int64,
    (rows, k), best first, self excluded, -1 padding), ``index.faiss`` (the trained and filled
    index, so a resumed run searches the same index) and ``knn.json`` last, with the plan, timings
    and the recall on ``recall_sample`` held-out rows (left out of quantizer training) against
    exact search. A run whose settings differ from the folder's starts over.

    Args:
        shards: the embeddings reader.
        out: output folder.
        k: neighbours per row.
        kind, memory_bytes, gpu, nlist, nprobe, pq_m, rerank: see :func:`plan_index`.
        recall_sample: held-out rows whose neighbours are also found exactly (0 = skip).
        recall_radius: cosine distance under which an exact neighbour counts as a graph edge.
        batch_size: query rows per search call (bounds result buffers).
        seed: training and recall samples.
        save_index: keep ``index.faiss`` for resuming (costs its size on disk).
    """
    from refface.manifests.atomic import atomic_path, write_json
    from refface.mining.neighbors import _faiss
    from refface.stages import fingerprint

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    faiss = _faiss()
    out = Path(out)
    n = len(shards)
    plan = plan_index(n, shards.dim, kind, memory_bytes, gpu, nlist, nprobe, pq_m, rerank)
    rng = np.random.default_rng(seed + 1)
    held = (
        np.sort(rng.choice(n, min(recall_sample, n), replace=False))
        if recall_sample
        else np.empty(0, np.int64)
    )
    settings = {
        "k": k,
        "plan": asdict(plan),
        "seed": seed,
        "recall_sample": int(held.size),
    }
    fp = fingerprint("sharded_knn", KNN_VERSION, settings, shards.meta)
    state_path = out / "knn.state.json"
    done_path = out / "knn.json"
    if done_path.exists() and json.loads(done_path.read_text()).get("fingerprint") == fp:
        meta = json.loads(done_path.read_text())
        return KnnResult(out, n, k, plan, meta["recall"], meta["timings"], 0)
    out.mkdir(parents=True, exist_ok=True)
    if not state_path.exists() or json.loads(state_path.read_text()).get("fingerprint") != fp:
        # Different settings: parts of an older search must not be mixed in.
        for old in [*out.glob("knn-*.npz"), out / "index.faiss", done_path]:
            old.unlink(missing_ok=True)
        write_json(state_path, {"fingerprint": fp, "settings": settings})
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index_path = out / "index.faiss"
    if index_path.exists():
        index = faiss.read_index(str(index_path))
        if plan.kind != "flat":
            faiss.extract_index_ivf(index).nprobe = plan.nprobe
        if plan.gpu:
            index = _to_gpu(faiss, index, plan)
    else:
        index = build_sharded_index(shards, plan, exclude=held, seed=seed)
        if save_index and plan.kind != "flat":
            cpu = faiss.index_gpu_to_cpu(index) if plan.gpu else index
            with atomic_path(index_path) as tmp:
                faiss.write_index(cpu, str(tmp))
    timings["build_s"] = round(time.perf_counter() - t0, 2)
    id_dtype = np.int32 if n < 2**31 else np.int64
    t0 = time.perf_counter()
    searched = 0
    from refface.console import make_progress

    with make_progress() as progress:
        task = progress.add_task("k-NN shards", total=n)
        for s, start, mm in shards.iter_shards():
            part = out / f"knn-{s:06d}.npz"
            if part.exists():
                progress.advance(task, mm.shape[0])
                continue
            sims = np.empty((mm.shape[0], k), np.float32)
            idx = np.empty((mm.shape[0], k), np.int64)
            for b in range(0, mm.shape[0], batch_size):
                q = np.ascontiguousarray(mm[b : b + batch_size], dtype=np.float32)
                ids = np.arange(start + b, start + b + q.shape[0], dtype=np.int64)
                sims[b : b + q.shape[0]], idx[b : b + q.shape[0]] = _search(index, plan, shards, q, ids, k)
                progress.advance(task, q.shape[0])
            with atomic_path(part) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, sims=sims, idx=idx.astype(id_dtype))
            searched += 1
    timings["search_s"] = round(time.perf_counter() - t0, 2)
    result = KnnResult(out, n, k, plan, {}, timings, searched)
    if held.size:
        t0 = time.perf_counter()
        e_sims, e_idx = exact_knn(shards, held, k)
        a_sims, a_idx = _rows_of(result, shards, held)
        result.recall = graph_recall(a_sims, a_idx, e_sims, e_idx, recall_radius)
        result.recall["sample"] = int(held.size)
        timings["recall_s"] = round(time.perf_counter() - t0, 2)
    write_json(
        done_path,
        {
            "version": KNN_VERSION,
            "fingerprint": fp,
            "n": n,
            "k": k,
            "plan": asdict(plan),
            "starts": [int(s["start"]) for s in shards.shards],
            "recall": result.recall,
            "timings": timings,
        },
    )
    return result


def _rows_of(result: KnnResult, shards: ShardedEmbeddings, ids: np.ndarray):
    which = np.searchsorted(shards.starts, ids, side="right") - 1
    sims = np.empty((ids.size, result.k), np.float32)
    idx = np.empty((ids.size, result.k), np.int64)
    for s in np.unique(which):
        mask = which == s
        p_sims, p_idx = result.part(int(s))
        local = ids[mask] - shards.starts[s]
        sims[mask], idx[mask] = p_sims[local], p_idx[local]
    return sims, idx


# ------------------------------------------------------------------------------ sparse clustering
CLUSTER_METHODS = ("components", "average")


def cluster_edges(
    n: int,
    rows: np.ndarray,
    cols: np.ndarray,
    dist: np.ndarray,
    threshold: float,
    method: str = "average",
    missing: float | None = None,
) -> np.ndarray:
    """Cluster ``n`` items from sparse edges (no dense matrix; memory grows with the edge count).

    Args:
        n: number of items (graph nodes).
        rows, cols, dist: edges with cosine distance (either or both directions).
        threshold: cosine distance of "same identity".
        method: ``components`` (connected components of edges below ``threshold``: ReF-LDM's rule,
            via scipy's sparse graph routines) or ``average`` (the chain-resistant sparse average
            linkage of :func:`refface.mining.cluster.average_linkage_graph`; edges should reach
            out to ``missing``).
        missing: distance assumed for pairs without an edge in ``average`` (default: the largest
            edge distance, at least ``threshold``).

    Returns:
        (n,) int64 canonical labels: clusters numbered by size, singletons -1.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    from refface.mining.cluster import average_linkage_graph, relabel

    if method not in CLUSTER_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(CLUSTER_METHODS)}")
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    dist = np.asarray(dist, dtype=np.float64)
    if method == "components":
        keep = dist < threshold
        graph = sparse.coo_matrix(
            (np.ones(int(keep.sum()), np.int8), (rows[keep], cols[keep])), shape=(n, n)
        ).tocsr()
        _, comp = connected_components(graph, directed=False)
        return relabel(comp)
    if missing is None:
        missing = max(float(threshold), float(dist.max()) if dist.size else float(threshold))
    return relabel(average_linkage_graph(n, rows, cols, dist, float(threshold), float(missing)))


def cluster_sharded(
    result: KnnResult, threshold: float, method: str = "average", graph_factor: float = 2.0
) -> np.ndarray:
    """Cluster a sharded k-NN graph: edges within ``graph_factor * threshold`` (average) or
    ``threshold`` (components), read part by part."""
    radius = min(1.0, graph_factor * threshold) if method == "average" else threshold
    rows, cols, dist = result.edges(radius)
    return cluster_edges(result.n, rows, cols, dist, threshold, method, missing=radius)


# ------------------------------------------------------------------------------ synthetic data
def synthetic_identities(
    n: int, singleton_share: float = 0.5, mean_size: float = 4.0, seed: int = 0
) -> np.ndarray:
    """Identity label of each of ``n`` faces, shaped like mined web photos.

    About ``singleton_share`` of the faces are the only photo of their person; the others come in
    identities of 2 + Poisson(``mean_size`` - 2) photos. Rows are shuffled so an identity's photos
    land in different shards, as they do in a crawl.
    """
    rng = np.random.default_rng([seed, 1])
    n_multi = int(round(n * (1 - singleton_share)))
    sizes = 2 + rng.poisson(max(mean_size - 2, 0), size=max(1, n_multi // 2 + 1))
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n_multi, side="right")) + 1]
    sizes[-1] -= max(0, int(sizes.sum()) - n_multi)
    sizes = sizes[sizes > 0]
    labels = np.concatenate(
        [np.repeat(np.arange(sizes.size), sizes), sizes.size + np.arange(n - int(sizes.sum()))]
    )
    return labels[rng.permutation(n)].astype(np.int64)


def write_synthetic_shards(
    folder: str | os.PathLike,
    n: int,
    dim: int = 512,
    rows_per_shard: int = 250_000,
    singleton_share: float = 0.5,
    mean_size: float = 4.0,
    spread: tuple[float, float] = (0.45, 0.8),
    seed: int = 0,
) -> tuple[ShardedEmbeddings, np.ndarray]:
    """Unit vectors clustered like face embeddings of :func:`synthetic_identities`, written as shards.

    Each identity has a centre drawn with a decaying spectrum (standard deviation of dimension j
    proportional to (1 + j)^-1/4: real embeddings are not isotropic, which is what lets IVF
    lists form) and its photos scatter around it with a per-identity noise level from ``spread``
    (same-person cosine about 1 / (1 + sigma^2): 0.61-0.83, different people about 0 +- 0.06,
    like ArcFace). Every value is a function of (seed, row), so the bytes do not depend on the
    shard size. Returns the reader and the identity labels.
    """
    folder = Path(folder)
    labels = synthetic_identities(n, singleton_share, mean_size, seed)
    scale = (1.0 + np.arange(dim)) ** -0.25
    scale = (scale / np.sqrt((scale**2).sum())).astype(np.float32)
    block = 65_536

    # Every centre once (n_identities x dim float32), block by block from its own seed. Above
    # 1 GB (12.8 GB at 10M faces) they live in a scratch file beside the folder, not in memory.
    n_ids = int(labels.max()) + 1
    scratch = folder.parent / f".{folder.name}-centres.npy"
    folder.mkdir(parents=True, exist_ok=True)
    if n_ids * dim * 4 > 2**30:
        centres = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(n_ids, dim))
    else:
        centres = np.empty((n_ids, dim), np.float32)
    for b in range(0, n_ids, block):
        g = np.random.default_rng([seed, 2, b // block]).standard_normal((block, dim), dtype=np.float32)
        centres[b : b + block] = g[: min(block, n_ids - b)] * scale
    for b in range(0, n_ids, block):
        centres[b : b + block] /= np.linalg.norm(centres[b : b + block], axis=1, keepdims=True)

    sigma_all = np.random.default_rng([seed, 3]).uniform(*spread, size=n_ids).astype(np.float32)
    for s, start in enumerate(range(0, n, rows_per_shard)):
        if (folder / f"{shard_name(s)}.npy").exists():
            continue
        stop = min(n, start + rows_per_shard)
        ids = labels[start:stop]
        vec = centres[ids]
        for b in range(start // block, (stop - 1) // block + 1):
            # Noise per block of rows, so any shard size gives the same bytes.
            lo, hi = max(start, b * block), min(stop, (b + 1) * block)
            g = np.random.default_rng([seed, 4, b]).standard_normal((block, dim), dtype=np.float32)
            rows = slice(lo - start, hi - start)
            vec[rows] += g[lo - b * block : hi - b * block] * (sigma_all[ids[rows]] / np.sqrt(dim))[:, None]
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        write_shard(folder, s, vec)
    del centres
    scratch.unlink(missing_ok=True)
    # No checksums: the bytes are a function of the seed, which the index records.
    meta = {"model": "synthetic", "metric": "cosine", "identity_threshold": 0.4, "seed": seed}
    finish_shards(folder, meta, checksums=False)
    return ShardedEmbeddings(folder), labels
