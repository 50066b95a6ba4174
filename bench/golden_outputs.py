"""Digest every output of a small end-to-end run, to prove a refactor leaves the bytes unchanged.

Runs the CLI (``python -m refface.cli``) on a subset of the shared photos: ``embed`` (sharded) and
``knn-graph``, ``build ffhq-ref``, ``degrade``, ``shards write`` (train and test), ``validate`` and
``audit``; then writes the SHA-256 of every output file (stage manifests and build.json hold
timings and are left out). Compare two digests with ``--compare``. Usage::

    python bench/golden_outputs.py --work /tmp/golden-new --digest bench/results/golden_new.json
    python bench/golden_outputs.py --compare bench/results/golden_outputs.json bench/results/golden_new.json

``--code DIR`` runs the package found in DIR (e.g. an exported older commit) instead of this checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ["deepface", "face_recognition", "faceapi_js_bbt"]
# Files whose bytes hold wall-clock times or absolute paths of the run folder.
VOLATILE = {"build.json"}
TEXT_SUFFIXES = {".json", ".csv", ".md", ".html", ".txt"}


def _cli(code: Path, *args: str, ok: tuple[int, ...] = (0,)) -> str:
    env = dict(os.environ, PYTHONPATH=str(code), REFFACE_PROGRESS="0", COLUMNS="200")
    proc = subprocess.run(
        [sys.executable, "-m", "refface.cli", *args], env=env, capture_output=True, text=True
    )
    print(f"refface {args[0]} {args[1]}: exit {proc.returncode}", flush=True)
    if proc.returncode not in ok:
        raise SystemExit(f"refface {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def run(code: Path, photos: Path, work: Path) -> None:
    """Run every stage into ``work`` (which is emptied first)."""
    shutil.rmtree(work, ignore_errors=True)
    images = work / "photos"
    for name in FOLDERS:
        shutil.copytree(photos / name, images / name)
    root, emb = work / "root", work / "emb"
    _cli(code, "embed", str(images), "--out", str(emb), "--shard-rows", "40", "--workers", "2")
    _cli(code, "knn-graph", str(emb), "--k", "8")
    _cli(code, "build", "ffhq-ref", str(images), "--out", str(root), "--detector", "dlib", "--workers", "2")
    _cli(code, "degrade", str(root), "--preset", "refldm-severe", "--workers", "2")
    _cli(code, "shards", str(root), "--out", str(work / "shards_train"), "--split", "train")
    _cli(
        code,
        "shards",
        str(root),
        "--out",
        str(work / "shards_test"),
        "--split",
        "test",
        "--lq-preset",
        "refldm-moderate",
    )
    _cli(code, "shards", "verify", str(work / "shards_train"))
    validate = _cli(code, "validate", str(root), ok=(0, 1))
    (work / "validate.txt").write_text(validate.replace(str(work), "WORK"))
    _cli(
        code,
        "audit",
        "--set",
        f"train={root / 'train_image.txt'}",
        "--set",
        f"test={root / 'test_image.txt'}",
        "--out",
        str(work / "audit"),
        "--workers",
        "2",
        ok=(0, 1),
    )


def _drop_timings(obj):
    """JSON without wall-clock figures (keys naming seconds or times) and without the stage
    fingerprints that hash input files' modification times (the tables are written anew each run)."""
    if isinstance(obj, dict):
        return {
            k: _drop_timings(v)
            for k, v in obj.items()
            if not (
                k.endswith("_s")
                or "time" in k
                or k in ("seconds", "faces_per_second", "fingerprint", "tables")
                # the shard index's input fingerprint of the image files (their modification times)
                or (k == "images" and isinstance(v, str))
            )
        }
    if isinstance(obj, list):
        return [_drop_timings(v) for v in obj]
    return obj


def _normalized(path: Path, work: Path) -> bytes:
    """The file's bytes; text files with the run folder written as WORK, JSON without timings."""
    data = path.read_bytes()
    if path.suffix == ".parquet" and path.name == "hashes.parquet":
        # The audit's hash cache keys rows by absolute path: compare it with the run folder as WORK.
        table = pd.read_parquet(path)
        table["path"] = table["path"].str.replace(str(work), "WORK", regex=False)
        # ``stat`` (size:mtime) only keys the cache to the file as written in this run.
        table = table.drop(columns=["stat"], errors="ignore")
        return table.to_csv(index=False).encode()
    if path.suffix not in TEXT_SUFFIXES:
        return data
    text = data.decode().replace(str(work.resolve()), "WORK").replace(str(work), "WORK")
    if path.suffix == ".json":
        text = json.dumps(_drop_timings(json.loads(text)), sort_keys=True)
    if path.suffix == ".html":
        text = re.sub(r"Timings: [^<]*", "Timings: -", text)
    return text.encode()


def digest(work: Path) -> dict[str, str]:
    """SHA-256 of every output under ``work`` (normalized, see :func:`_normalized`), by relative path."""
    out = {}
    for path in sorted(work.rglob("*")):
        rel = path.relative_to(work).as_posix()
        if not path.is_file() or rel.startswith("photos/") or "/.stages/" in f"/{rel}":
            continue
        if path.name in VOLATILE or path.suffix == ".lock":
            continue
        out[rel] = hashlib.sha256(_normalized(path, work)).hexdigest()
    return out


def compare(a: Path, b: Path) -> int:
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    bad = sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))
    for key in bad:
        print(f"DIFFERS {key}: {da.get(key, 'missing')[:12]} vs {db.get(key, 'missing')[:12]}")
    print(f"{len(da)} vs {len(db)} files; {len(bad)} differ")
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code", type=Path, default=REPO, help="folder holding the refface package to run")
    parser.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    parser.add_argument("--work", type=Path, default=Path("/tmp/refface-golden"))
    parser.add_argument("--digest", type=Path, default=REPO / "bench" / "results" / "golden_new.json")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"))
    parser.add_argument("--digest-only", action="store_true", help="digest an existing --work folder")
    args = parser.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare))
    if not args.digest_only:
        run(args.code.resolve(), args.photos, args.work)
    args.digest.parent.mkdir(parents=True, exist_ok=True)
    args.digest.write_text(json.dumps(digest(args.work), indent=1, sort_keys=True) + "\n")
    print(f"{args.digest}: {len(json.loads(args.digest.read_text()))} files")


if __name__ == "__main__":
    main()
