"""Identity review page and corrections: rules, the builders' corrections stage, the page in chromium."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from common.cdp import Browser, find_chromium
from common.review_root import image_paths, make_review_root

from refface.builders.ffhq_ref import FFHQRefConfig, build_mined
from refface.manifests.references import read_references
from refface.review.corrections import apply_corrections, format_corrections, parse_corrections
from refface.review.data import ReviewConfig, outlier_bar, review_data
from refface.review.page import write_review

CHROMIUM = find_chromium()
SPLITS = ("train", "val", "test")


def table(rows):
    df = pd.DataFrame(rows, columns=["path", "identity"])
    sizes = df[df["identity"] >= 0].groupby("identity")["path"].transform("size")
    df["cluster_size"] = sizes.reindex(df.index).fillna(1).astype("int64")
    return df


CLUSTERED = table(
    [
        ("a0", 0),
        ("a1", 0),
        ("a2", 0),
        ("b0", 1),
        ("b1", 1),
        ("c0", 2),
        ("c1", 2),
        ("d0", 3),
        ("d1", 3),
        ("s", -1),
    ]
)


def corrected(text: str):
    out, report = apply_corrections(CLUSTERED, parse_corrections(text))
    return dict(zip(out["path"], out["identity"], strict=True)), report


def test_actions_move_merge_drop_singleton_and_new_identities():
    ident, report = corrected(
        "path,action,value\n"
        "a0,drop,\n"
        "a1,move,1\n"
        "c0,merge,3\n"  # all of identity 2 joins 3
        "s,move,new:pair\n"
        "d0,move,new:pair\n"  # lone s and d0 form one new identity
        "b0,singleton,\n"
    )
    assert ident["a0"] == -1 and report.dropped == ["a0"]
    assert ident["a1"] == 1 and ident["b1"] == 1 and ident["b0"] == -1
    assert ident["a2"] == -1  # identity 0 was left with one image
    assert ident["c0"] == ident["c1"] == ident["d1"] == 3
    assert ident["s"] == ident["d0"] == 4  # new identities are numbered after the largest one
    assert report.new_identities == [4]
    assert report.changed_identities == [0, 1, 2, 3, 4]
    assert len(report.applied) == 6 and not report.unmatched


def test_rows_that_match_nothing_are_reported_with_the_reason():
    ident, report = corrected(
        "path,action,value\n"
        "gone.png,drop,\n"
        "a0,move,17\n"
        "a1,rename,x\n"
        "b0,move,a0\n"  # an image path names its clustered identity
        "b0,singleton,\n"  # the last row of an image wins
        "c0,merge,c1\n"
    )
    reasons = {u["row"]: u["reason"] for u in report.unmatched}
    assert "not in this dataset root" in reasons[1]
    assert "identity 17 does not exist" in reasons[2]
    assert "unknown action" in reasons[3]
    assert "superseded" in reasons[4]
    assert "already is" in reasons[6]
    assert ident["b0"] == -1 and ident["a0"] == 0 and ident["c0"] == 2
    assert [a["row"] for a in report.applied] == [5]
    assert report.changed_identities == [1]


def test_chained_merges_follow_through_and_are_order_independent():
    a, _ = corrected("path,action,value\na0,merge,1\nb0,merge,2\n")
    b, _ = corrected("path,action,value\nb0,merge,2\na0,merge,1\n")
    assert a == b
    assert a["a0"] == a["b0"] == a["c0"] == 2


def test_pool_builds_take_drop_and_singleton_and_report_moves():
    from refface.review.corrections import pool_exclusions

    rows = parse_corrections("path,action,value\nt1,drop,\np2,singleton,\np3,move,4\nzz,drop,\n")
    drop_t, drop_p, report = pool_exclusions(rows, ["t1", "t2"], ["p1", "p2", "p3", "t1"])
    assert drop_t == {"t1"} and drop_p == {"p2", "t1"}
    reasons = {u["path"]: u["reason"] for u in report.unmatched}
    assert "needs identity clusters" in reasons["p3"] and "not among" in reasons["zz"]


def test_parse_rejects_a_file_without_the_columns():
    with pytest.raises(ValueError, match="path, action, value"):
        parse_corrections("file,what\nx,drop\n")
    text = format_corrections([("a, b.png", "move", "3")])
    assert parse_corrections(text)[0].path == "a, b.png"


def test_outlier_bar_is_never_below_the_threshold():
    assert outlier_bar(np.array([0.0, 0.1, 0.1]), 0.4) == 0.4
    d = np.array([0.0, 0.30, 0.31, 0.32, 0.33, 0.34, 0.9])
    assert 0.4 <= outlier_bar(d, 0.4) < 0.9


# ----------------------------------------------------------------------------------------- built root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = make_review_root(tmp_path_factory.mktemp("review") / "root")
    build_mined(root, config(), root / "images", image_paths(root))
    return root


def config(corrections: Path | None = None) -> FFHQRefConfig:
    return FFHQRefConfig(
        plots=False,
        val_identities=1,
        test_identities=1,
        cluster_method="average",  # a fixed cut: the planted geometry is made for average linkage at 0.4
        identity_threshold=0.4,
        corrections=str(corrections) if corrections else None,
    )


def snapshot(root: Path) -> dict:
    ids = pd.read_parquet(root / "identities.parquet")
    splits = pd.read_parquet(root / "splits.parquet")
    refs = {}
    for s in SPLITS:
        df = read_references(root / f"{s}_references.csv")
        refs.update({g: tuple(r) for g, r in zip(df["gt_image"], df["ref_image"], strict=True)})
    return {
        "identity": dict(zip(ids["path"], ids["identity"], strict=True)),
        "split": dict(zip(splits["path"], splits["split"], strict=True)),
        "refs": refs,
        "bytes": (root / "identities.parquet").read_bytes(),
    }


def test_review_data_orders_by_medoid_distance_and_finds_pairs_and_near_singletons(built):
    data = review_data(built, ReviewConfig())
    by_id = {c["id"]: c for c in data["clusters"]}
    assert len(by_id) == 6 and all(len(c["faces"]) == 4 for c in by_id.values())
    for c in by_id.values():
        dists = [data["dist"][i] for i in c["faces"]]
        assert dists[0] == 0.0 and dists == sorted(dists) and c["faces"][0] == c["medoid"]
    path_of = data["paths"]
    ident = {path_of[by_id[k]["medoid"]].split("/")[0]: k for k in by_id}
    id3, id4 = ident["id3"], ident["id4"]
    pairs = {tuple(sorted((c["id"], o))) for c in data["clusters"] for o, _ in c["near"]}
    assert pairs == {tuple(sorted((id3, id4)))}
    near = by_id[ident["id0"]]["singletons"]
    assert [path_of[i] for i, _ in near] == ["lone/near0.png"]
    assert 0.4 < near[0][1] < 0.5
    # A wrong face planted into a cluster is flagged; the clean members are not.
    ids = pd.read_parquet(built / "identities.parquet")
    ids.loc[ids["path"] == "lone/far.png", "identity"] = ident["id2"]
    planted = built.parent / "planted"
    planted.mkdir(exist_ok=True)
    for name in ("images.parquet", "embeddings.npy", "embeddings.parquet", "embeddings.json", "build.json"):
        (planted / name).write_bytes((built / name).read_bytes())
    ids.to_parquet(planted / "identities.parquet", index=False)
    data = review_data(planted)
    flagged = [data["paths"][i] for i, f in enumerate(data["flagged"]) if f]
    assert flagged == ["lone/far.png"]


def test_corrections_rebuild_changes_exactly_the_corrected_identities(built, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(built, root)
    before = snapshot(root)
    ident = before["identity"]
    ids = {p.split("/")[0]: ident[p] for p in ident if not p.startswith("lone")}
    csv = tmp_path / "corrections.csv"
    csv.write_text(
        "path,action,value\n"
        f"id1/0.png,move,{ids['id0']}\n"
        f"id3/2.png,merge,{ids['id4']}\n"
        "id2/3.png,drop,\n"
        "missing.png,drop,\n"
    )
    build_mined(root, config(csv), root / "images", image_paths(root))
    after = snapshot(root)
    touched = {ids[k] for k in ("id0", "id1", "id2", "id3", "id4")}
    report = json.loads((root / "corrections.json").read_text())
    assert report["changed_identities"] == sorted(touched)
    assert report["applied"] == 3 and [u["path"] for u in report["unmatched"]] == ["missing.png"]
    assert after["identity"]["id1/0.png"] == ids["id0"]
    assert {after["identity"][f"id3/{j}.png"] for j in range(4)} == {ids["id4"]}
    assert after["identity"]["id2/3.png"] == -1 and "id2/3.png" not in after["split"]
    assert all("id2/3.png" not in refs for refs in after["refs"].values())
    # Nothing else moved: the untouched identity keeps its members (the split drawing may give it
    # another split when the set of identities changes; within a split its references stay).
    for path, i in before["identity"].items():
        if i not in touched and i >= 0:
            assert after["identity"][path] == i
            if after["split"][path] == before["split"][path] == "train":
                assert after["refs"].get(path) == before["refs"].get(path)
    build = json.loads((root / "build.json").read_text())
    assert build["corrections"]["applied"] == 3 and build["config"]["corrections"] == str(csv)
    card = (root / "card.md").read_text()
    assert "## Corrections" in card and "missing.png" in card and "not in this dataset root" in card
    # Building again without the file restores the clustering's own identities byte for byte.
    build_mined(root, config(), root / "images", image_paths(root))
    assert snapshot(root)["bytes"] == before["bytes"]
    assert not (root / "corrections.json").exists()


def test_audit_reads_the_corrected_identities(built, tmp_path):
    import shutil

    from refface.audit.config import AuditConfig
    from refface.audit.run import audit_sets
    from refface.audit.sets import root_identities

    root = tmp_path / "root"
    shutil.copytree(built, root)
    ids = snapshot(root)["identity"]
    csv = tmp_path / "corrections.csv"
    csv.write_text(f"path,action,value\nid1/0.png,move,{ids['id0/0.png']}\nid2/3.png,drop,\n")
    build_mined(root, config(csv), root / "images", image_paths(root))
    corrected = snapshot(root)["identity"]
    labels = root_identities(root, image_paths(root))
    assert labels is not None  # the corrected table still covers every embedding row
    assert dict(zip(image_paths(root), labels.tolist(), strict=True)) == corrected
    assert corrected["id1/0.png"] == ids["id0/0.png"] and corrected["id2/3.png"] == -1
    summary = audit_sets(
        {"train": root / "train_image.txt", "test": root / "test_image.txt"},
        tmp_path / "audit",
        AuditConfig(workers=1, max_leak_rate=1.0),
    )
    pair = summary["pairs"]["train~test"]
    assert pair["identities_from"] == f"{root}/identities.parquet"
    assert pair["leaked_identities"] == 0


# ----------------------------------------------------------------------------------------- the page


def press(browser: Browser, *keys: str) -> None:
    for key in keys:
        browser.key(key)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (apt-get install -y chromium)")
def test_page_in_headless_chromium_produces_the_expected_corrections(built, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(built, root)
    summary = write_review(root, ReviewConfig(workers=1))
    page = root / "review" / "index.html"
    assert summary["thumbnails written"] == 26 and summary["thumbnail errors"] == 0
    assert write_review(root, ReviewConfig(workers=1))["thumbnails written"] == 0  # written once
    text = page.read_text() + (root / "review" / "review.js").read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched from outside
    data = review_data(root)
    paths = data["paths"]
    clusters = sorted(data["clusters"], key=lambda c: c["id"])
    c0, c1, c2, c3 = clusters[0], clusters[1], clusters[2], clusters[3]
    assert paths[c0["singletons"][0][0]] == "lone/near0.png"
    with Browser(CHROMIUM, tmp_path / "profile") as browser:
        browser.open(page.as_uri())
        status = browser.eval("new Promise(r => setTimeout(() => r(window.refface.status()), 500))")
        assert status["rows"] == 6 and status["broken"] == 0
        first_row = browser.eval(
            "Array.from(document.querySelectorAll('.row')[0].querySelectorAll('.faces img'))"
            ".map(i => i.complete && i.naturalWidth)"
        )
        assert len(first_row) == 5 and all(w == 96 for w in first_row), first_row  # 4 faces + 1 singleton
        # identity 0: move the nearby singleton in (the box proposes this identity), drop its last face.
        press(browser, "l", "l", "l", "l", "m", "Enter", "h", "d")
        # identity 1: split its second face off.
        press(browser, "j", "l", "s")
        # identity 2: drop then undo, then move its second face to a new identity.
        press(browser, "j", "l", "d", "u", "m")
        browser.type_text("new:solo")
        press(browser, "Enter")
        # identity 3: merge into its "possible same person" partner with the pair's button.
        browser.click(f'.row[data-id="{c3["id"]}"] button[data-merge-into]')
        csv_text = browser.eval("window.refface.exportCSV()")
        expected = format_corrections(
            [
                (paths[c3["medoid"]], "merge", str(c3["near"][0][0])),
                *sorted(
                    [
                        (paths[c0["faces"][3]], "drop", ""),
                        (paths[c1["faces"][1]], "singleton", ""),
                        (paths[c2["faces"][1]], "move", "new:solo"),
                        ("lone/near0.png", "move", str(c0["id"])),
                    ]
                ),
            ]
        )
        assert csv_text == expected
        # Decisions survive a reload (localStorage) ...
        browser.open(page.as_uri())
        assert browser.eval("window.refface.exportCSV()") == expected
        # ... and a cleared page loads them back from the exported file.
        exported = tmp_path / "corrections.csv"
        exported.write_text(csv_text)
        browser.click("#clear")
        assert browser.eval("window.refface.exportCSV()") == "path,action,value\n"
        doc = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", {"nodeId": doc, "selector": "#load"})["nodeId"]
        browser.send("DOM.setFileInputFiles", {"nodeId": node, "files": [str(exported)]})
        browser.eval("new Promise(r => setTimeout(r, 300))")
        assert browser.eval("window.refface.exportCSV()") == expected
        # The reference list of a target opens.
        browser.click(".face .refs")
        assert browser.eval("document.getElementById('refs-panel').hidden") is False
        assert browser.eval("document.querySelectorAll('#refs-body img').length") >= 1
    # The rebuild with the page's file changes exactly the identities it touched.
    before = snapshot(root)
    build_mined(root, config(exported), root / "images", image_paths(root))
    after = snapshot(root)
    report = json.loads((root / "corrections.json").read_text())
    assert report["applied"] == 5 and not report["unmatched"]
    touched = {c0["id"], c1["id"], c2["id"], c3["id"], c3["near"][0][0]}
    assert set(report["changed_identities"]) == touched
    changed = {i for p, i in before["identity"].items() if after["identity"].get(p) != i and i >= 0}
    changed |= {i for p, i in after["identity"].items() if before["identity"].get(p) != i and i >= 0}
    assert changed == touched


def test_cli_review_and_bad_corrections_file(built, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from refface.cli import app

    root = tmp_path / "root"
    shutil.copytree(built, root)
    runner = CliRunner()
    result = runner.invoke(app, ["review", str(root), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert (root / "review" / "index.html").exists() and (root / "review" / "data.js").exists()
    for builder in ("ffhq-ref", "reface-hq", "celeba-test-ref"):
        assert "--corrections" in runner.invoke(app, ["build", builder, "--help"]).output, builder
    bad = tmp_path / "bad.csv"
    bad.write_text("file,what\nx,drop\n")
    with pytest.raises(ValueError, match="path, action, value"):
        build_mined(root, config(bad), root / "images", image_paths(root))
    result = runner.invoke(app, ["review", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error" in result.output
