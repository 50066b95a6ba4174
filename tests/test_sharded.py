"""Sharded embeddings, index choice, sharded k-NN (resumable, recall-checked) and sparse clustering."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from refface.manifests import embedding_shards
from refface.manifests.embedding_shards import ShardedEmbeddings, finish_shards, write_shard
from refface.manifests.embeddings import shard_embeddings
from refface.mining.ann import FLAT_MAX, index_bytes, plan_index
from refface.mining.sharded import cluster_edges, cluster_sharded, sharded_knn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synthetic import synthetic_identities, write_synthetic_shards


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "emb"
    return write_synthetic_shards(folder, 3000, dim=64, rows_per_shard=700, seed=3)


def test_write_read_take(tmp_path):
    x = _unit(25, 8)
    write_shard(tmp_path, 0, x[:10], [f"a{i}.jpg" for i in range(10)], list(range(10)))
    write_shard(tmp_path, 1, x[10:], [f"b{i}.jpg" for i in range(15)])
    index = finish_shards(tmp_path, {"model": "m"})
    assert index["count"] == 25 and index["dim"] == 8 and index["has_tables"]
    assert [s["start"] for s in index["shards"]] == [0, 10]
    reader = ShardedEmbeddings(tmp_path)
    assert len(reader) == 25 and reader.dim == 8 and reader.n_shards == 2
    assert isinstance(reader.shard(1), np.memmap)
    ids = np.array([24, 0, 11, 11, 9, 10])
    np.testing.assert_array_equal(reader.take(ids), x[ids])
    assert reader.paths()[:2] == ["a0.jpg", "a1.jpg"] and reader.paths()[10] == "b0.jpg"
    with pytest.raises(IndexError):
        reader.take(np.array([25]))
    # Pair scores read rows in id order but come back in the caller's order.
    queries = _unit(len(ids), 8, seed=5)
    np.testing.assert_array_equal(reader.dot(ids, queries), np.einsum("cd,cd->c", x[ids], queries))
    assert reader.dot(np.empty(0, np.int64), np.empty((0, 8), np.float32)).shape == (0,)
    with pytest.raises(IndexError):
        reader.dot(np.array([-1]), queries[:1])
    index = json.loads((tmp_path / "index.json").read_text())
    assert [len(s["sha256"]) for s in index["shards"]] == [64, 64]


def test_incomplete_or_foreign_folders_are_refused(tmp_path):
    x = _unit(4, 8)
    write_shard(tmp_path, 0, x)
    with pytest.raises(FileNotFoundError, match="index.json is written last"):
        ShardedEmbeddings(tmp_path)
    write_shard(tmp_path, 2, x)
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        finish_shards(tmp_path)
    (tmp_path / "shard-000002.npy").unlink()
    finish_shards(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        ShardedEmbeddings(tmp_path)


def test_shard_a_dataset_root(tmp_path):
    from refface.manifests.embeddings import Embeddings, save_embeddings

    x = _unit(23, 16, seed=1)
    paths = [f"p/{i:03d}.jpg" for i in range(23)]
    emb = Embeddings(x, paths, model="m", fingerprint="f" * 64, image_ids=list(range(100, 123)))
    save_embeddings(tmp_path, emb)
    reader = shard_embeddings(tmp_path, rows_per_shard=10)
    assert reader.n_shards == 3 and reader.meta["fingerprint"] == "f" * 64
    np.testing.assert_array_equal(reader.take(np.arange(23)), x)
    assert reader.paths() == paths
    # Resumable: a shard already written is kept as is.
    stamp = (tmp_path / "embeddings_shards" / "shard-000001.npy").stat().st_mtime_ns
    shard_embeddings(tmp_path, rows_per_shard=10)
    assert (tmp_path / "embeddings_shards" / "shard-000001.npy").stat().st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError, match="refface embed"):
        shard_embeddings(tmp_path / "nowhere")


def test_a_sharded_root_is_read_where_it_is(tmp_path):
    from refface.manifests.embeddings import load_embeddings, save_embedding_tables

    x = _unit(12, 8, seed=2)
    paths = [f"q/{i}.jpg" for i in range(12)]
    for s, rows in enumerate((slice(0, 5), slice(5, 12))):
        write_shard(tmp_path / "embeddings_shards", s, x[rows], paths[rows])
    finish_shards(tmp_path / "embeddings_shards", {"model": "m", "fingerprint": "e" * 64})
    meta = {"model": "m", "dim": 8, "fingerprint": "e" * 64, "metric": "cosine", "identity_threshold": 0.4}
    layout = {"layout": "sharded", "shards": "embeddings_shards"}
    save_embedding_tables(tmp_path, paths, None, None, {**meta, **layout})
    assert shard_embeddings(tmp_path).n_shards == 2  # already sharded: nothing is split
    with pytest.raises(ValueError, match="already holds sharded embeddings"):
        shard_embeddings(tmp_path, tmp_path / "elsewhere")
    loaded = load_embeddings(tmp_path)
    np.testing.assert_array_equal(loaded.vectors, x)
    assert loaded.paths == paths


def test_index_choice_by_size_memory_and_gpu():
    gb = 1024**3
    assert plan_index(FLAT_MAX - 1, 512, gpu=False).kind == "flat"
    cpu = plan_index(10_000_000, 512, memory_bytes=64 * gb, gpu=False)
    assert cpu.kind == "ivf_pq" and cpu.pq_bits == 4 and cpu.pq_m == 64 and cpu.rerank >= 1
    assert cpu.nlist == 8192 and cpu.nprobe == 64 and cpu.train_size == 39 * 8192
    assert plan_index(10_000_000, 512, memory_bytes=64 * gb, gpu=True).kind == "ivf_flat"
    # 10M x 512 float32 = 20.5 GB of vectors: more than half of 32 GB, so PQ codes even on GPU.
    small = plan_index(10_000_000, 512, memory_bytes=32 * gb, gpu=True)
    assert small.kind == "ivf_pq" and small.pq_bits == 8
    assert plan_index(5000, 64, kind="ivf_flat", gpu=False).nlist == 128
    assert index_bytes("flat", 10, 4) == 160
    assert index_bytes("ivf_flat", 10, 4, nlist=2) == 10 * (16 + 8) + 2 * 16
    with pytest.raises(ValueError, match="unknown index kind"):
        plan_index(10, 4, kind="hnsw")
    with pytest.raises(ValueError, match="must divide"):
        plan_index(10, 10, kind="ivf_pq", pq_m=3)


def test_synthetic_identities_shape_and_determinism(tmp_path):
    labels = synthetic_identities(10_000, singleton_share=0.5, seed=1)
    sizes = np.bincount(labels)
    assert labels.size == 10_000 and np.array_equal(labels, synthetic_identities(10_000, 0.5, seed=1))
    assert 0.45 < (sizes[labels] == 1).mean() < 0.55
    assert 2 <= sizes[sizes > 1].min() and sizes.max() < 20
    a, _ = write_synthetic_shards(tmp_path / "a", 1500, dim=32, rows_per_shard=400, seed=2)
    b, _ = write_synthetic_shards(tmp_path / "b", 1500, dim=32, rows_per_shard=1000, seed=2)
    np.testing.assert_array_equal(a.take(np.arange(1500)), b.take(np.arange(1500)))


def test_flat_sharded_knn_matches_exact_and_resumes(synth, tmp_path):
    from refface.mining.neighbors import knn

    reader, _ = synth
    vectors = reader.take(np.arange(len(reader)))
    result = sharded_knn(reader, tmp_path / "knn", k=8, recall_sample=200)
    assert result.plan.kind == "flat" and result.shards_searched == reader.n_shards
    assert result.recall["recall_at_k"] == 1.0 and result.recall["sample"] == 200
    e_sims, e_idx = knn(vectors, 8, index="flat")
    got = np.concatenate([result.part(s)[1] for s in range(reader.n_shards)])
    sims = np.concatenate([result.part(s)[0] for s in range(reader.n_shards)])
    np.testing.assert_allclose(sims, e_sims, atol=1e-5)
    # Same neighbour sets (order may differ only between exact ties).
    assert np.mean(np.sort(got, axis=1) == np.sort(e_idx, axis=1)) > 0.999

    # Done: a rerun does nothing. A lost part is redone alone and gives the same bytes.
    assert sharded_knn(reader, tmp_path / "knn", k=8, recall_sample=200).shards_searched == 0
    before = (tmp_path / "knn" / "knn-000002.npz").read_bytes()
    (tmp_path / "knn" / "knn-000002.npz").unlink()
    (tmp_path / "knn" / "knn.json").unlink()
    again = sharded_knn(reader, tmp_path / "knn", k=8, recall_sample=200)
    assert again.shards_searched == 1
    assert (tmp_path / "knn" / "knn-000002.npz").read_bytes() == before
    # Other settings start over instead of mixing parts.
    assert sharded_knn(reader, tmp_path / "knn", k=4, recall_sample=0).shards_searched == reader.n_shards


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_approximate_graph_recall_is_measured(synth, tmp_path, kind):
    reader, _ = synth
    result = sharded_knn(reader, tmp_path / kind, k=8, kind=kind, nlist=16, nprobe=4, recall_sample=300)
    meta = json.loads((tmp_path / kind / "knn.json").read_text())
    assert meta["plan"]["kind"] == kind and meta["recall"] == result.recall
    assert (tmp_path / kind / "index.faiss").exists()
    # Same-identity edges (cosine distance < 0.4) are what clustering needs: nearly all found.
    assert result.recall["edges_in_sample"] > 100
    assert result.recall["edge_recall"] >= 0.9
    assert 0 < result.recall["recall_at_k"] <= 1


def test_sparse_clustering_matches_the_dense_path_methods(synth, tmp_path):
    from refface.mining.cluster import ClusterConfig, cluster
    from refface.mining.metrics import explode_singletons, pairwise_prf

    reader, labels = synth
    vectors = reader.take(np.arange(len(reader)))
    result = sharded_knn(reader, tmp_path / "knn", k=16, recall_sample=0)
    for method in ("components", "average"):
        ours = cluster_sharded(result, 0.4, method, graph_factor=2.0)
        ref = cluster(vectors, method, 0.4, ClusterConfig(k=16, graph_factor=2.0, index="flat"))
        np.testing.assert_array_equal(ours, ref)
        _, _, f = pairwise_prf(labels, explode_singletons(ours))
        assert f > 0.9, (method, f)


def test_cluster_edges_scales_with_edges_not_nodes():
    # Two million nodes, a chain of 5 and a pair: memory grows with edges, never with N^2.
    n = 2_000_000
    rows = np.array([10, 11, 12, 13, 1_999_998])
    cols = np.array([11, 12, 13, 14, 1_999_999])
    dist = np.array([0.1, 0.1, 0.1, 0.1, 0.2])
    comp = cluster_edges(n, rows, cols, dist, threshold=0.4, method="components")
    assert comp.shape == (n,) and comp[10] == comp[14] == 0 and comp[1_999_999] == 1
    assert (comp == -1).sum() == n - 7
    avg = cluster_edges(n, rows, cols, dist, threshold=0.4, method="average", missing=0.8)
    # Average linkage refuses to chain 10..14: the far ends are "missing" (0.8) apart.
    assert avg[1_999_998] == avg[1_999_999] >= 0 and (avg >= 0).sum() < 7
    with pytest.raises(ValueError, match="unknown method"):
        cluster_edges(n, rows, cols, dist, 0.4, method="leiden")


def test_module_names_its_layout():
    assert (
        embedding_shards.INDEX_FILE == "index.json"
        and embedding_shards.vector_shard_name(3) == "shard-000003"
    )


def test_knn_graph_command_end_to_end(synth, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from refface.cli import app
    from refface.manifests.embeddings import Embeddings, save_embeddings

    reader, labels = synth
    paths = [f"id{label}/{i}.jpg" for i, label in enumerate(labels)]
    emb = Embeddings(reader.take(np.arange(len(reader))), paths, model="m", fingerprint="0" * 64)
    save_embeddings(tmp_path, emb)
    args = ["knn-graph", str(tmp_path), "--k", "8", "--recall-sample", "100", "--rows-per-shard", "1000"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "embeddings_shards" / "shard-000002.npy").exists()
    table = pd.read_parquet(tmp_path / "knn" / "identities.parquet")
    assert table["path"].tolist() == paths
    # Faces of one identity share a cluster far more often than not.
    same = table.groupby(table["path"].str.split("/").str[0])["identity"].nunique()
    assert (same == 1).mean() > 0.9
    stamps = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "knn").glob("knn-*.npz")}
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    # The second run searches nothing: every part is left as it was.
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "knn").glob("knn-*.npz")} == stamps
    assert json.loads((tmp_path / "knn" / "knn.json").read_text())["recall"]["sample"] == 100
    bad = CliRunner().invoke(app, args + ["--method", "leiden"])
    assert bad.exit_code == 2 and "unknown method" in bad.output
