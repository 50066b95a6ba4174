"""Planning an approximate nearest-neighbour index for N vectors: exact below ~1M, IVF-Flat or IVF-PQ
above, sized by the memory at hand, trained on a sample, on GPU when FAISS sees one."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from refface.manifests.embedding_shards import ShardedEmbeddings
from refface.mining.neighbors import default_nlist, gpu_available, load_faiss

# Below this many vectors exact search is affordable (and needs no training).
FLAT_MAX = 1_000_000


INDEX_KINDS = ("flat", "ivf_flat", "ivf_pq")


# Share of the memory budget one index may take.
INDEX_MEMORY_SHARE = 0.5


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


def to_gpu(faiss, index, plan: IndexPlan):
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
    faiss = load_faiss()
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
        index = to_gpu(faiss, index, plan)
    for _, _, mm in shards.iter_shards():
        for start in range(0, mm.shape[0], 262_144):
            index.add(np.ascontiguousarray(mm[start : start + 262_144], dtype=np.float32))
    return index
