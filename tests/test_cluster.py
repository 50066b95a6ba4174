"""Identity clustering: synthetic identities, chaining through a bad edge, the stage, the CLI and the
quality bar on the shared labeled photos."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from common.faces_root import faces_root  # noqa: F401  (session fixture)
from typer.testing import CliRunner

from refface.manifests.embeddings import Embeddings, load_embeddings, save_embeddings
from refface.mining import cluster as cl
from refface.mining.metrics import evaluate_assignments, score_labels


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def identities(n_ids: int, per: int, n_single: int, dim: int = 32, noise: float = 0.04, seed: int = 0):
    """Unit vectors of ``n_ids`` identities with ``per`` faces each plus ``n_single`` lone faces."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_ids + n_single, dim)))
    labels = np.concatenate([np.repeat(np.arange(n_ids), per), n_ids + np.arange(n_single)])
    return unit(centres[labels] + noise * rng.normal(size=(labels.size, dim))), labels


def bridged(per: int = 20, gap: float = 0.3, seed: int = 1):
    """Two tight identities whose centres are ``gap`` apart (cosine distance) and one face between them."""
    rng = np.random.default_rng(seed)
    e1, e2 = np.eye(16)[0], np.eye(16)[1]
    theta = np.arccos(1 - gap)
    ca, cb = e1, np.cos(theta) * e1 + np.sin(theta) * e2
    a = unit(ca + 0.01 * rng.normal(size=(per, 16)))
    b = unit(cb + 0.01 * rng.normal(size=(per, 16)))
    bridge = unit((ca + cb)[None])
    return np.concatenate([a, b, bridge]), np.r_[np.zeros(per), np.ones(per), [2]].astype(int)


@pytest.mark.parametrize("method", sorted(cl.CLUSTERERS))
def test_synthetic_identities_are_recovered_with_singletons(method):
    x, labels = identities(n_ids=30, per=6, n_single=25)
    pred = cl.cluster(x, method=method, threshold=0.1)
    s = score_labels(labels, pred)
    assert s.pairwise_f == pytest.approx(1.0) and s.bcubed_f == pytest.approx(1.0)
    assert (pred[-25:] == -1).all()  # lone faces stay singletons, labeled -1
    assert pred.max() == 29


def test_one_bridge_face_chains_components_but_not_average_linkage():
    x, labels = bridged()
    tau = 0.2  # the two identities are 0.3 apart; the bridge is ~0.08 from both
    comp = cl.cluster(x, method="components", threshold=tau)
    assert len(set(comp.tolist())) == 1  # everything chained into one identity
    avg = cl.cluster(x, method="average", threshold=tau)
    assert len(set(avg[:20].tolist())) == 1 and len(set(avg[20:40].tolist())) == 1
    assert avg[0] != avg[20]  # the two identities stay apart
    assert avg[40] in (avg[0], avg[20])


def test_single_bad_edge_between_cliques():
    # Two 10-cliques at distance 0.02 and one false edge of distance 0 between them.
    rows, cols, dist = [], [], []
    for base in (0, 10):
        for i in range(base, base + 10):
            for j in range(i + 1, base + 10):
                rows.append(i)
                cols.append(j)
                dist.append(0.02)
    rows.append(3)
    cols.append(15)
    dist.append(0.0)
    r, c, d = np.array(rows), np.array(cols), np.array(dist)
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    n_comp, _ = connected_components(
        sparse.coo_matrix((np.ones(r.size), (r, c)), shape=(20, 20)), directed=False
    )
    assert n_comp == 1
    labels = cl.relabel(cl.average_linkage_graph(20, r, c, d, threshold=0.1, missing=0.2))
    a, b = np.delete(labels[:10], 3), np.delete(labels[10:], 5)
    assert len(set(a.tolist())) == 1 and len(set(b.tolist())) == 1 and a[0] != b[0]
    # At worst the two endpoints of the false edge pair up on their own; they never pull the cliques together.
    assert labels[3] in (a[0], labels[15]) and labels[15] in (b[0], labels[3])


def test_sparse_average_linkage_equals_scipy_on_a_complete_graph():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    x, _ = identities(n_ids=12, per=5, n_single=10, noise=0.15, seed=3)
    ref = fcluster(linkage(pdist(x.astype(np.float64), "cosine"), "average"), 0.3, "distance")
    config = cl.ClusterConfig(k=len(x) - 1, graph_factor=100.0)
    mine = cl.cluster(x, method="average", threshold=0.3, config=config)
    assert 5 < mine.max() < 40  # a non-trivial partition
    np.testing.assert_array_equal(mine, cl.relabel(ref))  # canonical labels: the same partition


def test_relabel_is_canonical():
    np.testing.assert_array_equal(cl.relabel(np.array([7, 3, 3, 9, 7, 7, 5])), [0, 1, 1, -1, 0, 0, -1])
    assert cl.relabel(np.array([], dtype=int)).size == 0


def test_thresholds_defaults_and_validation():
    dlib_like = Embeddings(
        np.eye(3), ["a", "b", "c"], "dlib_face_recognition_resnet_model_v1", "fp", "cosine", 0.0932
    )
    assert cl.default_threshold(dlib_like, "average") == cl.AVERAGE_THRESHOLDS[dlib_like.model]
    assert cl.default_threshold(dlib_like, "components") == pytest.approx(0.0932)
    assert cl.default_threshold(np.eye(3), "average") == cl.ARCFACE_THRESHOLD
    assert cl.cosine_threshold(0.6, "euclidean") == pytest.approx(0.18)
    with pytest.raises(ValueError, match="metric"):
        cl.cosine_threshold(0.6, "manhattan")
    with pytest.raises(ValueError, match="unknown clustering method"):
        cl.cluster(np.eye(3), method="kmeans")
    with pytest.raises(ValueError, match="threshold"):
        cl.cluster(np.eye(3), threshold=1.5)
    with pytest.raises(ValueError, match="vectors"):
        cl.cluster(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        cl.cluster(np.array([[1.0, 0.0], [np.nan, 1.0]]))
    # raw (unnormalized) vectors are compared by angle, as unit vectors
    raw = np.array([[3.0, 0.0], [0.0, 0.5], [2.0, 0.01]])
    np.testing.assert_array_equal(cl.cluster(raw, method="components", threshold=0.1), [0, -1, 0])
    assert cl.cluster(np.empty((0, 8))).size == 0
    np.testing.assert_array_equal(cl.cluster(np.eye(4)[:1]), [-1])


def make_root(tmp_path, n_ids=8, per=4, n_single=5):
    x, labels = identities(n_ids, per, n_single, seed=4)
    paths = [f"img/{i:03d}.jpg" for i in range(len(x))]
    root = tmp_path / "root"
    save_embeddings(root, Embeddings(x, paths, "toy", "f" * 64, "cosine", 0.1))
    truth = pd.DataFrame({"path": paths, "identity": [f"id{v}" for v in labels]})
    truth.loc[0, "identity"] = ""  # an unlabeled photo is not scored
    truth.to_csv(tmp_path / "labels.csv", index=False)
    return root, labels


def test_cluster_root_writes_identities_and_skips_when_done(tmp_path):
    root, labels = make_root(tmp_path)
    manifest, ran = cl.cluster_root(root)
    assert ran
    df = pd.read_parquet(root / "identities.parquet")
    assert list(df.columns) == ["path", "identity", "cluster_size", "radius", "impostor_scale"]
    assert manifest["config"]["method"] == "impostor" and manifest["config"]["threshold"] is None
    assert manifest["impostor_model"]["exponent"] > 0 and (df["radius"] > 0).all()
    assert (df.loc[df.identity == -1, "cluster_size"] == 1).all()
    assert (
        df.loc[df.identity >= 0].groupby("identity").size()
        == df.loc[df.identity >= 0].groupby("identity")["cluster_size"].first()
    ).all()
    assert manifest["counts"] == {
        "faces": 37,
        "clusters": 8,
        "clustered_faces": 32,
        "singletons": 5,
        "largest_cluster": 4,
    }
    assert score_labels(labels, df["identity"].to_numpy()).pairwise_f == pytest.approx(1.0)
    before = (root / "identities.parquet").stat().st_mtime_ns
    _, ran = cl.cluster_root(root)
    assert not ran and (root / "identities.parquet").stat().st_mtime_ns == before
    manifest, ran = cl.cluster_root(root, cl.ClusterConfig(method="components"))
    assert ran
    assert manifest["config"]["threshold"] == pytest.approx(0.1)  # the embeddings' own threshold
    np.testing.assert_allclose(pd.read_parquet(root / "identities.parquet")["radius"], 0.1)
    # New embeddings (fewer faces) make the stage run again.
    emb = load_embeddings(root)
    save_embeddings(
        root, Embeddings(emb.vectors[:10], emb.paths[:10], emb.model, emb.fingerprint, "cosine", 0.1)
    )
    manifest, ran = cl.cluster_root(root, cl.ClusterConfig(method="components"))
    assert (
        ran and manifest["counts"]["faces"] == 10 and len(pd.read_parquet(root / "identities.parquet")) == 10
    )


def test_cli_cluster_and_eval_clusters(tmp_path):
    from refface.cli import app

    root, _ = make_root(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["cluster", str(root), "--method", "average"])
    assert res.exit_code == 0, res.output
    assert "clusters (2+ faces)" in res.output and (root / "identities.parquet").exists()
    res = runner.invoke(app, ["cluster", str(root), "--method", "average"])
    assert "up to date" in res.output
    # The default (impostor, 37 faces) reports its second pass, in the summary and the manifest.
    res = runner.invoke(app, ["cluster", str(root)])
    assert res.exit_code == 0 and "second pass" in res.output, res.output
    manifest = json.loads((root / ".stages" / "identities.json").read_text())
    assert set(manifest["second_pass"]) == {"fragments_merged", "lone_faces_joined"}
    out = tmp_path / "scores.json"
    res = runner.invoke(
        app, ["eval-clusters", str(root), "--labels", str(tmp_path / "labels.csv"), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "pair F" in res.output and "B3 F" in res.output
    scores = json.loads(out.read_text())["identities.parquet"]
    assert (
        scores["pairwise_f"] == pytest.approx(1.0) and scores["n_items"] == 36 and scores["n_unlabeled"] == 1
    )
    res = runner.invoke(
        app,
        ["eval-clusters", str(root), "--labels", str(tmp_path / "labels.csv"), "--method", "components",
         "--threshold", "0.05", "--threshold", "0.1"],
    )  # fmt: skip
    assert res.exit_code == 0 and "components 0.05" in res.output and "components 0.1" in res.output


def test_cli_reports_bad_inputs(tmp_path):
    from refface.cli import app

    root, _ = make_root(tmp_path)
    runner = CliRunner()
    bad = tmp_path / "bad.csv"
    bad.write_text("file,name\na,b\n")
    res = runner.invoke(app, ["eval-clusters", str(root), "--labels", str(bad)])
    assert res.exit_code == 2 and "path, identity" in res.output
    res = runner.invoke(app, ["eval-clusters", str(root), "--labels", str(tmp_path / "labels.csv")])
    assert res.exit_code == 2 and "refface cluster" in res.output  # no identities.parquet yet
    res = runner.invoke(app, ["cluster", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "refface embed" in res.output
    res = runner.invoke(app, ["cluster", str(root), "--method", "kmeans"])
    assert res.exit_code == 2 and "unknown clustering method" in res.output


@pytest.mark.slow
@pytest.mark.faces
def test_default_clustering_on_shared_photos_holds_its_figures(faces_root, faces_labels):  # noqa: F811
    emb = load_embeddings(faces_root)
    assert emb.model == "dlib_face_recognition_resnet_model_v1"
    pred = cl.cluster(emb)
    scores = evaluate_assignments(
        dict(zip(emb.paths, pred.tolist(), strict=True)),
        dict(zip(faces_labels.path, faces_labels.identity, strict=True)),
    )
    assert scores.n_items == int((faces_labels.identity != "").sum())
    # The fixed cut this default replaced scored pairwise F 0.967 and BCubed F 0.981 here.
    assert scores.pairwise_f >= 0.967, scores
    assert scores.bcubed_f >= 0.981, scores
