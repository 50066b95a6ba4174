"""Synthetic face-like embeddings for scale benchmarks and tests: identities of power-law sizes plus
singletons, as unit vectors written as embedding shards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from refface.manifests.embedding_shards import (
    ShardedEmbeddings,
    finish_shards,
    vector_shard_name,
    write_shard,
)


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
        if (folder / f"{vector_shard_name(s)}.npy").exists():
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
