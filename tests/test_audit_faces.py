"""Leakage audit on the shared labeled photos: identity vs random splits, planted duplicates, the HTML report."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from common.faces_root import faces_root  # noqa: F401  (session fixture)
from PIL import Image
from typer.testing import CliRunner

from refface.cli import app
from refface.manifests.references import write_references
from refface.manifests.splits import write_split_list
from refface.seeding import item_rng

pytestmark = pytest.mark.faces
ROOT_FILES = [
    "images.parquet",
    "faces.parquet",
    "embeddings.npy",
    "embeddings.parquet",
    "embeddings.json",
    ".stages",
]


def make_view(mined: Path, root: Path) -> Path:
    """A dataset root sharing the cached mined files (symlinks) whose split lists a test writes."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ROOT_FILES:
        (root / name).symlink_to(Path(mined) / name)
    return root


@pytest.fixture(scope="module")
def view_root(faces_root, tmp_path_factory) -> Path:  # noqa: F811
    return make_view(faces_root, tmp_path_factory.mktemp("audit-root"))


@pytest.fixture(scope="module")
def hash_cache(tmp_path_factory) -> Path:
    """One hash cache for every audit of this module: each photo is decoded once."""
    return tmp_path_factory.mktemp("audit-cache")


@pytest.fixture(scope="module")
def root_paths(view_root) -> list[str]:
    return pd.read_parquet(view_root / "images.parquet")["path"].tolist()


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def write_lists(folder: Path, sides: dict[str, list[str]]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, paths in sides.items():
        out[name] = folder / f"{name}_image.txt"
        write_split_list(out[name], paths)
    return out


@pytest.fixture(scope="module")
def random_split_audit(view_root, root_paths, hash_cache, tmp_path_factory):
    """Random image split of all photos (per-image seed), audited through the CLI."""
    side = {p: bool(item_rng(0, p).random() < 0.5) for p in root_paths}
    lists = write_lists(
        view_root / "random",
        {"train": [p for p in root_paths if side[p]], "test": [p for p in root_paths if not side[p]]},
    )
    out = tmp_path_factory.mktemp("random-audit")
    code, output = run_cli(
        "--set",
        f"train={lists['train']}",
        "--set",
        f"test={lists['test']}",
        "--out",
        str(out),
        "--workers",
        "2",
    )
    return code, output, out, side


def test_random_split_leaks_match_the_labels(random_split_audit, faces_labels):
    code, output, out, side = random_split_audit
    assert code == 1, output  # leaks above the default max rate of 0 fail the gate
    assert "leakage between sets" in output and "FAILED" in output
    summary = json.loads((out / "summary.json").read_text())
    pair = summary["pairs"]["train~test"]
    assert pair["leaked_identities"] > 50
    labels = dict(zip(faces_labels["path"], faces_labels["identity"], strict=True))
    leaks = pd.read_csv(out / "leaks.csv", keep_default_na=False)
    assert set(leaks["kind"]) <= {"exact", "near_duplicate", "same_identity"}
    # An image is predicted leaked when it has a leak partner with a label on the other side.
    predicted = set()
    for a, b in zip(leaks["image_a"], leaks["image_b"], strict=True):
        if labels.get(a) and labels.get(b):
            predicted.update((a, b))
    labeled = [p for p in side if labels.get(p)]
    by_side: dict[bool, set[str]] = {True: set(), False: set()}
    for p in labeled:
        by_side[side[p]].add(labels[p])
    truth = {p for p in labeled if labels[p] in by_side[not side[p]]}
    tp = len(predicted & truth)
    precision, recall = tp / len(predicted), tp / len(truth)
    assert len(truth) > 500
    assert precision >= 0.95, (precision, sorted(predicted - truth)[:10])
    assert recall >= 0.95, (recall, sorted(truth - predicted)[:10])


def identity_groups(root: Path, labeled: pd.DataFrame) -> dict[str, str]:
    """Label -> group, joining labels that the builder's identity clusters of the whole root mix.

    dlib cannot tell a few look-alikes apart (on these photos one Juan_Carlos_Ferrero photo sits in
    Lleyton_Hewitt's cluster, at cosine distance 0.056); a builder keeps what its embedder cannot
    separate on one side, and so does this split.
    """
    from refface.manifests.embeddings import load_embeddings
    from refface.mining.cluster import cluster

    emb = load_embeddings(root)
    clusters = dict(zip(emb.paths, cluster(emb), strict=True))
    parent = {label: label for label in labeled["identity"].unique()}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_label: dict[int, str] = {}
    for path, label in zip(labeled["path"], labeled["identity"], strict=True):
        c = clusters.get(path, -1)
        if c < 0:
            continue
        if c in first_label:
            a, b = sorted((find(first_label[c]), find(label)))
            parent[b] = a
        else:
            first_label[c] = label
    return {label: find(label) for label in parent}


def test_identity_split_reports_no_identity_leaks(view_root, faces_labels, hash_cache, tmp_path):
    # LFW names are real identities (the other sources number people per folder, so one person can
    # carry two labels there); split the LFW photos by identity.
    lfw = faces_labels[
        faces_labels["source"].isin(["lfw", "lfw_distractors"]) & (faces_labels["identity"] != "")
    ]
    groups = identity_groups(view_root, lfw)
    assert len(set(groups.values())) >= len(groups) - 3  # only a handful of look-alikes joined
    to_train = {g: bool(item_rng(0, g).random() < 0.5) for g in set(groups.values())}
    sides = {"train": [], "test": []}
    for path, ident in zip(lfw["path"], lfw["identity"], strict=True):
        sides["train" if to_train[groups[ident]] else "test"].append(path)
    lists = write_lists(view_root / "identity", sides)
    # Reference lists inside the split: every target's references are its own identity's photos.
    for split, paths in sides.items():
        groups = lfw[lfw["path"].isin(paths)].groupby("identity")["path"].apply(sorted)
        rows = [{"gt_image": g[0], "ref_image": g[1:], "lq_image": g[0]} for g in groups if len(g) > 1]
        write_references(view_root / "identity" / f"{split}_references.csv", rows, with_lq=split != "train")
    out = tmp_path / "audit"
    code, output = run_cli(
        "--set", f"train={lists['train']}", "--set", f"test={lists['test']}", "--out", str(out),
        "--workers", "2", "--identity-rule", "cluster",
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    pair = summary["pairs"]["train~test"]
    assert pair["leaked_identities"] == 0 and pair["leaked_pairs"] == 0, pair
    assert summary["references"]["cross_split_references"] == 0
    assert summary["sets"]["train"]["images"] + summary["sets"]["test"]["images"] == len(lfw)
    assert code == 0 and summary["passed"], output

    # A reference list that reaches into the other split fails the gate even without image leaks.
    write_references(
        view_root / "identity" / "train_references.csv",
        [{"gt_image": sides["train"][0], "ref_image": [sides["test"][0]]}],
        with_lq=False,
    )
    code, output = run_cli(
        "--set", f"train={lists['train']}", "--set", f"test={lists['test']}", "--out", str(tmp_path / "again")
    )
    assert code == 1, output
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["references"]["cross_split_references"] == 1 and not again["passed"]
    leaks = pd.read_csv(tmp_path / "again" / "leaks.csv")
    assert leaks["kind"].tolist() == ["reference_cross_split"]


def test_planted_exact_and_near_duplicates_are_all_found(faces_root, faces_dir, hash_cache, tmp_path):  # noqa: F811
    from refface.audit.config import AuditConfig
    from refface.audit.run import audit_sets

    sources = [
        "lfw/Tony_Blair/Tony_Blair_0003.jpg",
        "lfw/Serena_Williams/Serena_Williams_0002.jpg",
        "lfw_distractors/" + sorted(os.listdir(faces_dir / "lfw_distractors"))[0],
        "deepface/person01/img2.jpg",
    ]
    planted = tmp_path / "planted"
    planted.mkdir()
    expected = {}
    for n, rel in enumerate(sources):
        src = faces_dir / rel
        if src.is_dir():  # lfw_distractors holds one folder per person
            rel = f"{rel}/{sorted(os.listdir(src))[0]}"
            src = faces_dir / rel
        rgb = Image.open(src).convert("RGB")
        shutil.copyfile(src, planted / f"{n}_copy.jpg")
        rgb.save(planted / f"{n}_resave.png")  # other bytes, same pixels
        rgb.save(planted / f"{n}_q40.jpg", quality=40)
        rgb.resize((rgb.width * 3 // 5, rgb.height * 3 // 5), Image.BICUBIC).save(
            planted / f"{n}_small.jpg", quality=90
        )
        rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(planted / f"{n}_mirror.jpg", quality=95)
        expected.update(
            {
                f"{n}_copy.jpg": (rel, "exact"),
                f"{n}_resave.png": (rel, "exact"),
                f"{n}_q40.jpg": (rel, "near_duplicate"),
                f"{n}_small.jpg": (rel, "near_duplicate"),
                f"{n}_mirror.jpg": (rel, "near_duplicate"),
            }
        )
    (planted / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "audit"
    view_root = make_view(faces_root, tmp_path / "root")
    config = AuditConfig(workers=2, cache_dir=str(hash_cache))
    summary = audit_sets({"root": view_root, "planted": planted}, out, config)
    leaks = pd.read_csv(out / "leaks.csv", keep_default_na=False)
    found = {(r.image_a, r.image_b): r for r in leaks.itertuples()}
    for name, (original, kind) in expected.items():
        assert (original, name) in found, f"{name} (copy of {original}) not found"
        row = found[(original, name)]
        assert row.kind == kind, (name, row.kind, row.similarity, row.phash_distance)
    assert found[(expected["0_mirror.jpg"][0], "0_mirror.jpg")].mirrored
    # Nothing planted is matched as a duplicate of a photo it was not made from.
    for (a, b), row in found.items():
        if row.kind in ("exact", "near_duplicate"):
            assert expected[b][0] == a or _same_picture(a, expected[b][0]), (a, b, row.kind)
    assert summary["pairs"]["root~planted"]["leaked_images"]["planted"] == len(expected)
    # The unreadable file is reported, not silently dropped.
    errors = pd.read_csv(out / "errors.csv")
    assert "planted:broken.jpg" in errors["path"].tolist()


def _same_picture(a: str, b: str) -> bool:
    # face_recognition/ holds one photo at several resolutions; LFW has no such repeats.
    return a.split("/")[:2] == b.split("/")[:2] and a.startswith("face_recognition/")


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(random_split_audit, tmp_path):
    _, _, out, _ = random_split_audit
    report = out / "report.html"
    html_text = report.read_text()
    assert "http://" not in html_text and "https://" not in html_text  # self-contained
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        report.resolve().as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    mark = re.search(r'<p id="render-check"([^>]*)>', dom)
    assert mark, "the page's load script did not run:\n" + dom[-2000:]
    attrs = dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', mark.group(1)))
    total, ok = int(attrs["data-images-total"]), int(attrs["data-images-ok"])
    assert total >= 2 and ok == total, attrs  # histogram + contact sheet, all decoded
    assert attrs["data-errors"] == "0", attrs
    assert 'id="summary-table"' in dom and "train~test" in dom
    widths = re.findall(r'<img class="(?:hist|sheet)"', dom)
    assert len(widths) == total
    # The summary table carries the audit's numbers.
    summary = json.loads((out / "summary.json").read_text())
    leaked = summary["pairs"]["train~test"]["leaked_images"]["test"]
    table = dom[dom.index('id="summary-table"') :].split("</table>")[0]
    assert f">{leaked}<" in table
    assert np.isfinite(summary["worst_leak_rate"])


def test_split_from_the_builders_identities_audits_clean(faces_root, hash_cache, tmp_path):  # noqa: F811
    """A split made from the root's own identities.parquet (as the builder splits) has no leaks."""
    from refface.manifests.atomic import write_parquet
    from refface.manifests.embeddings import load_embeddings
    from refface.mining.cluster import cluster, identities_frame

    root = make_view(faces_root, tmp_path / "root")
    emb = load_embeddings(root)
    write_parquet(root / "identities.parquet", identities_frame(emb.paths, cluster(emb)))
    ident = pd.read_parquet(root / "identities.parquet")
    # Identity clusters go to train or test by a per-identity seed; singletons and faceless images
    # stay in train, as the builder's split does by default.
    side = {
        p: "test" if i >= 0 and item_rng(1, str(i)).random() < 0.3 else "train"
        for p, i in zip(ident["path"], ident["identity"], strict=True)
    }
    images = pd.read_parquet(root / "images.parquet")["path"].tolist()
    lists = write_lists(
        root / "splits",
        {s: [p for p in images if side.get(p, "train") == s] for s in ("train", "test")},
    )
    out = tmp_path / "audit"
    code, output = run_cli(
        "--set", f"train={lists['train']}", "--set", f"test={lists['test']}", "--out", str(out)
    )
    summary = json.loads((out / "summary.json").read_text())
    pair = summary["pairs"]["train~test"]
    assert pair["identities_from"].endswith("identities.parquet")
    assert pair["leaked_pairs"] == 0 and pair["leaked_identities"] == 0, pair
    assert code == 0, output
