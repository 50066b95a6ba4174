"""Executors: local pool and Ray Data give the same chunk results and the same mined dataset bytes."""

from __future__ import annotations

import os
import sys

import pytest
from common.outputs import digest_mined

from refface.executors import (
    EXECUTORS,
    LocalExecutor,
    RayExecutor,
    declared_gpus,
    import_ray,
    make_executor,
    uses_gpu,
)
from refface.stages import map_chunks

_STATE: dict = {}


def _init(scale: int) -> None:
    _STATE["scale"] = scale


def _scale_chunk(chunk) -> dict:
    """Needs the initializer to have run in the worker; records the worker's pid."""
    return {"values": [v * _STATE["scale"] for v in chunk], "pid": os.getpid()}


@uses_gpu(0.25)
def _gpu_chunk(chunk):
    return list(chunk)


def _fail_on_seven(chunk):
    if 7 in chunk:
        raise RuntimeError("chunk with 7 failed")
    return list(chunk)


def _values(results: list[dict]) -> list[list[int]]:
    return [r["values"] for r in results]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    if not ray.is_initialized():
        # Workers import this module's chunk functions by name, as a stage's module would be.
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 1024**2,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    yield ray
    ray.shutdown()


def test_registry_and_lookup():
    assert set(EXECUTORS) == {"local", "ray"}
    assert isinstance(make_executor("local"), LocalExecutor)
    assert isinstance(make_executor("ray"), RayExecutor)
    custom = RayExecutor(num_gpus=0)
    assert make_executor(custom) is custom
    with pytest.raises(ValueError, match="unknown executor 'spark'; choose one of local, ray"):
        make_executor("spark")
    with pytest.raises(TypeError, match="run"):
        make_executor(object())


def test_local_worker_count_and_resume_do_not_change_results(tmp_path):
    items = list(range(23))
    one = map_chunks(_scale_chunk, items, 4, workers=1, initializer=_init, initargs=(3,))
    two = map_chunks(_scale_chunk, items, 4, workers=2, initializer=_init, initargs=(3,))
    assert _values(one) == _values(two) == [[3 * v for v in items[i : i + 4]] for i in range(0, 23, 4)]
    # Workers are separate processes with two of them.
    assert len({r["pid"] for r in two}) >= 1 and all(r["pid"] != os.getpid() for r in two)

    # A part file already present is read back, not recomputed.
    import pickle

    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "0.pkl").write_bytes(pickle.dumps({"values": ["kept"], "pid": 0}))
    resumed = map_chunks(
        _scale_chunk,
        items,
        4,
        part_path=lambda i: parts / f"{i}.pkl",
        write_part=lambda p, v: p.write_bytes(pickle.dumps(v)),
        read_part=lambda p: pickle.loads(p.read_bytes()),
        initializer=_init,
        initargs=(3,),
    )
    assert resumed[0]["values"] == ["kept"]
    assert _values(resumed)[1:] == _values(one)[1:]
    assert sorted(p.name for p in parts.iterdir()) == sorted(f"{i}.pkl" for i in range(6))


def test_uncollected_results_stay_on_disk(tmp_path):
    import pickle

    parts = tmp_path / "parts"
    parts.mkdir()
    kwargs = dict(
        part_path=lambda i: parts / f"{i}.pkl",
        write_part=lambda p, v: p.write_bytes(pickle.dumps(v)),
        initializer=_init,
        initargs=(2,),
    )
    results = map_chunks(_scale_chunk, list(range(10)), 4, collect=False, **kwargs)
    assert results == [None, None, None]
    on_disk = [pickle.loads((parts / f"{i}.pkl").read_bytes())["values"] for i in range(3)]
    assert on_disk == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18]]
    with pytest.raises(ValueError, match="needs part_path"):
        map_chunks(_scale_chunk, [1], 1, collect=False)


def test_gpu_requests():
    assert declared_gpus(_gpu_chunk) == 0.25
    assert declared_gpus(_scale_chunk) == 0.0
    auto = RayExecutor()
    assert auto.gpus_for(_gpu_chunk, cluster_gpus=0) == 0.0  # CPU-only cluster: runs on CPUs
    assert auto.gpus_for(_gpu_chunk, cluster_gpus=8) == 0.25
    assert auto.gpus_for(_scale_chunk, cluster_gpus=8) == 0.0
    with pytest.raises(RuntimeError, match="cluster has no GPUs"):
        RayExecutor(num_gpus=1).gpus_for(_scale_chunk, cluster_gpus=0)
    with pytest.raises(ValueError, match="GPU fraction"):
        uses_gpu(0)


def test_missing_ray_raises_with_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r'pip install "ray\[data\]"'):
        import_ray()
    with pytest.raises(ImportError, match="ray"):
        list(RayExecutor().run(_gpu_chunk, [(0, [1])]))


@pytest.mark.slow  # starts a Ray cluster
def test_ray_matches_local(ray_session, tmp_path):
    items = list(range(29))
    local = map_chunks(_scale_chunk, items, 4, workers=1, initializer=_init, initargs=(5,))
    import pickle

    parts = tmp_path / "parts"
    remote = map_chunks(
        _scale_chunk,
        items,
        4,
        workers=2,
        initializer=_init,
        initargs=(5,),
        executor="ray",
        part_path=lambda i: parts / f"{i}.pkl",
        write_part=lambda p, v: (p.parent.mkdir(exist_ok=True), p.write_bytes(pickle.dumps(v))),
        read_part=lambda p: pickle.loads(p.read_bytes()),
    )
    assert _values(remote) == _values(local)
    # Chunks ran in Ray worker processes (the initializer ran there), and every part was written.
    assert all(r["pid"] != os.getpid() for r in remote)
    assert len(list(parts.iterdir())) == len(remote) == 8
    assert map_chunks(_scale_chunk, [], 4, executor="ray") == []


@pytest.mark.slow  # starts a Ray cluster
def test_ray_failure_raises(ray_session):
    with pytest.raises(Exception, match="chunk with 7 failed"):
        map_chunks(_fail_on_seven, list(range(12)), 3, workers=2, executor="ray")


@pytest.mark.slow
def test_mine_folder_identical_local_and_ray(ray_session, faces_dir, faces_labels, tmp_path):
    from refface.mining.pipeline import MiningConfig, mine_folder

    lfw = sorted(p for p in faces_labels["path"] if p.startswith("lfw/"))
    others = sorted(p for p in faces_labels["path"] if p.startswith(("deepface/", "faceapi_js_bbt/")))
    subset = lfw[:20] + others[:4]
    local = mine_folder(
        faces_dir,
        tmp_path / "local",
        MiningConfig(workers=1, chunk_size=5, executor="local"),
        relpaths=subset,
    )
    remote = mine_folder(
        faces_dir,
        tmp_path / "ray",
        MiningConfig(workers=2, chunk_size=5, executor="ray"),
        relpaths=subset,
    )
    assert local.n_images == remote.n_images == 24
    assert remote.n_faces == local.n_faces > 0
    assert digest_mined(tmp_path / "ray") == digest_mined(tmp_path / "local")
    # The executor is not part of the stage's fingerprint: a rerun on the other executor is a no-op.
    again = mine_folder(
        faces_dir, tmp_path / "ray", MiningConfig(workers=1, chunk_size=5, executor="local"), relpaths=subset
    )
    assert again.ran is False
    # Ray writing shards (one per partition of 2 chunks) holds the rows of the local single file.
    sharded = tmp_path / "ray-sharded"
    mine_folder(
        faces_dir,
        sharded,
        MiningConfig(workers=2, chunk_size=5, executor="ray", shard_rows=10),
        relpaths=subset,
    )
    _same_rows_then_downstream(tmp_path / "local", sharded)


def _same_rows_then_downstream(single, sharded):
    """A sharded root reads as the single-file one, clusters alike, and feeds `refface knn-graph`."""
    import numpy as np
    import pandas as pd
    from typer.testing import CliRunner

    from refface.cli import app
    from refface.manifests.embedding_shards import ShardedEmbeddings
    from refface.mining.cluster import cluster_root

    reader = ShardedEmbeddings(sharded / "embeddings_shards")
    assert reader.n_shards == 3 and not (sharded / "embeddings.npy").exists()
    np.testing.assert_array_equal(reader.take(np.arange(len(reader))), np.load(single / "embeddings.npy"))
    cluster_root(single)
    cluster_root(sharded)
    assert (sharded / "identities.parquet").read_bytes() == (single / "identities.parquet").read_bytes()
    result = CliRunner().invoke(app, ["knn-graph", str(sharded), "--k", "5", "--recall-sample", "10"])
    assert result.exit_code == 0, result.output
    graph = pd.read_parquet(sharded / "knn" / "identities.parquet")
    assert graph["path"].tolist() == reader.paths()


def test_mining_config_rejects_unknown_executor():
    from refface.mining.pipeline import MiningConfig

    with pytest.raises(ValueError, match="executor 'dask' unknown; choose one of local, ray"):
        MiningConfig(executor="dask").validate()
    assert "executor" not in MiningConfig(executor="ray").stage_config()


def test_embed_command_takes_the_executor(tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    (tmp_path / "photos").mkdir()
    result = CliRunner().invoke(
        app, ["embed", str(tmp_path / "photos"), "--out", str(tmp_path / "o"), "--executor", "dask"]
    )
    assert result.exit_code == 2
    assert "executor 'dask' unknown" in result.output
