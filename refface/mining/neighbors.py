"""Neighbour search over unit embeddings with FAISS: k-NN, cross-set search and threshold graphs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from refface.devices import note_device, warn_faiss_cpu

log = logging.getLogger(__name__)

# Exact search is BLAS-bound (100k x 512 top-10 took ~1 min on 2 cores); from this size on an IVF
# index is the default because exact all-pairs search would take hours on a CPU.
EXACT_MAX = 1_000_000
DEFAULT_NPROBE = 32
DEFAULT_BATCH = 16_384
# FAISS GPU indexes cap k (and nprobe) at 2048.
GPU_MAX_K = 2048
INDEX_KINDS = ("flat", "ivf")


def load_faiss():
    # FAISS logs every CPU-variant probe at INFO; those lines are noise in a progress display.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a hard dependency
        raise ImportError("FAISS is required: pip install faiss-cpu (or a faiss GPU build)") from e
    return faiss


def gpu_available() -> bool:
    """True when the installed FAISS is a GPU build and sees at least one GPU."""
    faiss = load_faiss()
    get = getattr(faiss, "get_num_gpus", None)
    return bool(get and get() > 0)


def choose_index(n: int, index: str = "auto") -> str:
    """Resolve ``index`` ("auto", "flat" or "ivf") for a base of ``n`` vectors."""
    if index == "auto":
        return "flat" if n < EXACT_MAX else "ivf"
    if index not in INDEX_KINDS:
        raise ValueError(f"unknown index {index!r}; choose one of auto, {', '.join(INDEX_KINDS)}")
    return index


def default_nlist(n: int) -> int:
    """IVF lists, for the in-memory index and the sharded planner alike: the power of two nearest
    2*sqrt(N), within [16, 262144] and at most N/39 (FAISS's training floor), at least 1.

    FAISS's guideline is 4-16*sqrt(N); the low end keeps the coarse k-means and the per-query
    centroid scan (N * nlist * D flops in all) affordable on CPUs, and nprobe buys recall back.
    """
    target = 2 * math.sqrt(max(n, 1))
    lists = 2 ** round(math.log2(max(target, 1)))
    return int(max(1, min(max(16, lists), 262_144, max(1, n // 39))))


def _as_f32(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


@dataclass
class NeighborIndex:
    """A FAISS inner-product index over ``n`` base vectors, on CPU or GPU.

    ``cpu_index`` is always a CPU copy: FAISS GPU indexes have no range search, so threshold
    queries that k-NN cannot settle fall back to it.
    """

    kind: str
    n: int
    dim: int
    cpu_index: Any
    gpu_index: Any = None
    nlist: int = 0
    nprobe: int = DEFAULT_NPROBE
    _keep: list = field(default_factory=list, repr=False)

    @property
    def on_gpu(self) -> bool:
        return self.gpu_index is not None

    @property
    def index(self) -> Any:
        return self.gpu_index if self.gpu_index is not None else self.cpu_index


def build_index(
    base: np.ndarray,
    index: str = "auto",
    nprobe: int = DEFAULT_NPROBE,
    nlist: int | None = None,
    train_size: int | None = None,
    gpu: bool | None = None,
    seed: int = 0,
    train_iters: int = 10,
) -> NeighborIndex:
    """Build an inner-product index over ``base`` (rows should be L2-normalized).

    Args:
        base: (N, D) float vectors.
        index: "auto" (exact below ``EXACT_MAX`` = 1M vectors, IVF from there), "flat" or "ivf".
        nprobe: IVF lists visited per query (recall vs speed).
        nlist: IVF list count; default ``default_nlist(N)`` (about 2*sqrt(N)).
        train_size: vectors sampled to train the IVF quantizer; default 32 per list (at least 10k).
        gpu: put the index on GPU; None means "when a FAISS GPU build sees a GPU".
        seed: seed of the training sample.
        train_iters: k-means iterations of the IVF quantizer (FAISS's default 25 buys little
            recall for 2.5x the training time at 1M vectors).
    """
    faiss = load_faiss()
    base = _as_f32(base)
    n, dim = base.shape
    kind = choose_index(n, index)
    keep: list = []
    lists = 0
    if kind == "flat":
        cpu = faiss.IndexFlatIP(dim)
    else:
        lists = int(nlist) if nlist else default_nlist(n)
        if lists < 1 or lists > n:
            raise ValueError(f"nlist must be in [1, {n}] for {n} vectors, got {lists}")
        quantizer = faiss.IndexFlatIP(dim)
        keep.append(quantizer)  # the IVF index does not own its quantizer
        cpu = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        size = min(n, int(train_size) if train_size else max(32 * lists, 10_000))
        rng = np.random.default_rng(seed)
        sample = base if size >= n else base[np.sort(rng.choice(n, size, replace=False))]
        cpu.cp.niter = int(train_iters)
        cpu.cp.seed = int(seed) + 1234
        cpu.train(sample)
        cpu.nprobe = int(nprobe)
    cpu.add(base)
    result = NeighborIndex(
        kind=kind, n=n, dim=dim, cpu_index=cpu, nlist=lists, nprobe=int(nprobe), _keep=keep
    )
    if gpu is None:
        gpu = gpu_available()
        if not gpu:
            warn_faiss_cpu(0)
    if gpu:
        if not gpu_available():
            raise RuntimeError("gpu=True but this FAISS build sees no GPU (install a FAISS GPU build)")
        res = faiss.StandardGpuResources()
        result.gpu_index = faiss.index_cpu_to_gpu(res, 0, cpu)
        if kind == "ivf":
            result.gpu_index.nprobe = min(int(nprobe), GPU_MAX_K)
        keep.append(res)  # resources must outlive the GPU index

    note_device("faiss", f"gpu:0 ({kind})" if result.on_gpu else f"cpu ({kind})")
    return result


def _search_batched(index: NeighborIndex, query: np.ndarray, k: int, batch_size: int, gpu: bool = True):
    """k-NN of every query row, a batch at a time so result buffers stay bounded."""
    faiss_index = index.index if gpu else index.cpu_index
    n = query.shape[0]
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        d, i = faiss_index.search(query[start:stop], k)
        sims[start:stop] = d
        idx[start:stop] = i
    # FAISS pads missing neighbours with id -1 and a huge negative score; make that explicit.
    sims[idx < 0] = -np.inf
    return sims, idx


def search(
    query: np.ndarray,
    base: np.ndarray | NeighborIndex,
    k: int,
    index: str = "auto",
    nprobe: int = DEFAULT_NPROBE,
    batch_size: int = DEFAULT_BATCH,
    gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar ``base`` rows for every ``query`` row (cosine similarity on unit vectors).

    Returns:
        (similarities (Q, k) float32, indices (Q, k) int64), best first. Where the base holds
        fewer than ``k`` vectors the tail has index -1 and similarity -inf.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    query = _as_f32(query)
    built = base if isinstance(base, NeighborIndex) else build_index(base, index, nprobe=nprobe, gpu=gpu)
    if query.shape[1] != built.dim:
        raise ValueError(f"query dim {query.shape[1]} != base dim {built.dim}")
    if built.on_gpu and k > GPU_MAX_K:
        raise ValueError(f"FAISS GPU search supports k <= {GPU_MAX_K}, got {k}")
    return _search_batched(built, query, k, batch_size)


def knn(
    vectors: np.ndarray,
    k: int,
    index: str = "auto",
    nprobe: int = DEFAULT_NPROBE,
    batch_size: int = DEFAULT_BATCH,
    gpu: bool | None = None,
    built: NeighborIndex | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every vector among the others (self excluded).

    Returns:
        (similarities (N, k) float32, indices (N, k) int64), best first; -1 / -inf pad rows
        when N - 1 < k.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vectors = _as_f32(vectors)
    n = vectors.shape[0]
    built = built or build_index(vectors, index, nprobe=nprobe, gpu=gpu)
    sims, idx = search(vectors, built, k + 1, batch_size=batch_size)
    return drop_self(sims, idx, np.arange(n))


def drop_self(sims: np.ndarray, idx: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its (k+1)-neighbour row, leaving k columns.

    Exact duplicates may rank before self, and an approximate index may miss self entirely, in
    which case the last (worst) column goes instead.
    """
    n, k1 = idx.shape
    drop = idx == np.asarray(ids)[:, None]
    first = drop.argmax(axis=1)
    has_self = drop.any(axis=1)
    drop[:] = False
    drop[np.arange(n), np.where(has_self, first, k1 - 1)] = True
    keep = ~drop
    return sims[keep].reshape(n, k1 - 1), idx[keep].reshape(n, k1 - 1)


def _to_csr(rows: list[np.ndarray], cols: list[np.ndarray], vals: list[np.ndarray], n: int):
    from scipy import sparse

    r = np.concatenate(rows) if rows else np.empty(0, np.int64)
    c = np.concatenate(cols) if cols else np.empty(0, np.int64)
    v = np.concatenate(vals) if vals else np.empty(0, np.float32)
    keep = r != c
    g = sparse.csr_matrix((v[keep], (r[keep], c[keep])), shape=(n, n), dtype=np.float32)
    # Union of both directions: approximate search and float rounding at the boundary can
    # find an edge from one side only.
    g = g.maximum(g.T).tocsr()
    g.sort_indices()
    return g


def knn_graph(
    vectors: np.ndarray,
    k: int,
    index: str = "auto",
    nprobe: int = DEFAULT_NPROBE,
    batch_size: int = DEFAULT_BATCH,
    gpu: bool | None = None,
):
    """Symmetric sparse k-NN graph (scipy CSR, data = cosine similarity, no self loops)."""
    sims, idx = knn(vectors, k, index=index, nprobe=nprobe, batch_size=batch_size, gpu=gpu)
    n = sims.shape[0]
    rows = np.repeat(np.arange(n), sims.shape[1])
    ok = idx.ravel() >= 0
    return _to_csr([rows[ok]], [idx.ravel()[ok]], [sims.ravel()[ok]], n)


def _range_rows(cpu_index, query: np.ndarray, offset: int, radius: float, batch_size: int):
    rows, cols, vals = [], [], []
    for start in range(0, query.shape[0], batch_size):
        stop = min(query.shape[0], start + batch_size)
        lims, d, i = cpu_index.range_search(query[start:stop], float(radius))
        counts = np.diff(lims).astype(np.int64)
        rows.append(np.repeat(np.arange(offset + start, offset + stop), counts))
        cols.append(i.astype(np.int64))
        vals.append(d.astype(np.float32))
    return rows, cols, vals


def threshold_graph(
    vectors: np.ndarray,
    max_distance: float,
    index: str = "auto",
    nprobe: int = DEFAULT_NPROBE,
    batch_size: int = DEFAULT_BATCH,
    gpu: bool | None = None,
    method: str = "auto",
    k0: int = 32,
):
    """Graph of all pairs with cosine distance ``1 - <u, v>`` strictly below ``max_distance``.

    On CPU FAISS ``range_search`` finds every pair. On GPU (no range search) each row runs
    k-NN with a growing k until its k-th neighbour falls outside the radius; rows still
    saturated at k = 2048 are finished with a CPU range search.

    Args:
        vectors: (N, D) unit vectors.
        max_distance: the cosine-distance threshold tau (0 < tau <= 2).
        method: "auto" (range search on CPU, k-NN on GPU), "range" or "knn".
        k0: the first k of the k-NN method.

    Returns:
        Symmetric scipy CSR (N, N) without self loops; ``data`` holds the cosine *similarity*
        ``1 - distance`` of each edge (strictly positive for tau <= 1, so no edge is an
        implicit zero).
    """
    if not 0 < max_distance <= 2:
        raise ValueError(f"max_distance is a cosine distance in (0, 2], got {max_distance}")
    if method not in ("auto", "range", "knn"):
        raise ValueError(f"method must be auto, range or knn, got {method!r}")
    vectors = _as_f32(vectors)
    n = vectors.shape[0]
    built = build_index(vectors, index, nprobe=nprobe, gpu=gpu)
    radius = 1.0 - float(max_distance)
    if method == "auto":
        method = "knn" if built.on_gpu else "range"
    if method == "range":
        rows, cols, vals = _range_rows(built.cpu_index, vectors, 0, radius, batch_size)
        return _to_csr(rows, cols, vals, n)

    rows, cols, vals = [], [], []
    todo = np.arange(n)
    k = max(2, min(int(k0), n))
    max_k = min(n, GPU_MAX_K) if built.on_gpu else n
    while todo.size:
        sims, idx = _search_batched(built, vectors[todo], k, batch_size)
        inside = (sims > radius) & (idx >= 0)
        # A row whose k-th neighbour is still inside the radius may have more beyond it.
        saturated = inside[:, -1] if k < n else np.zeros(todo.size, bool)
        done = ~saturated
        r = np.repeat(todo[done], inside[done].sum(axis=1))
        rows.append(r)
        cols.append(idx[done][inside[done]])
        vals.append(sims[done][inside[done]])
        todo = todo[saturated]
        if todo.size and k >= max_k:
            log.info(
                "threshold graph: %d saturated rows at k=%d, finishing with CPU range search", todo.size, k
            )
            for r_, c_, v_ in zip(
                *_range_rows(built.cpu_index, vectors[todo], 0, radius, batch_size), strict=True
            ):
                rows.append(todo[r_])
                cols.append(c_)
                vals.append(v_)
            break
        k = min(max_k, k * 4)
    return _to_csr(rows, cols, vals, n)


def recall_at_k(approx_idx: np.ndarray, exact_idx: np.ndarray, batch_size: int = 65_536) -> float:
    """Mean fraction of each row's exact neighbours that the approximate search also returned.

    Both arrays are (N, k) neighbour ids; -1 entries of ``exact_idx`` (no neighbour) are not counted.
    """
    approx_idx = np.asarray(approx_idx)
    exact_idx = np.asarray(exact_idx)
    if approx_idx.shape[0] != exact_idx.shape[0]:
        raise ValueError(f"row counts differ: {approx_idx.shape[0]} vs {exact_idx.shape[0]}")
    hits = 0
    total = 0
    for start in range(0, exact_idx.shape[0], batch_size):
        a = approx_idx[start : start + batch_size]
        e = exact_idx[start : start + batch_size]
        valid = e >= 0
        found = (e[:, :, None] == a[:, None, :]).any(axis=2) & valid
        hits += int(found.sum())
        total += int(valid.sum())
    return hits / total if total else 1.0
