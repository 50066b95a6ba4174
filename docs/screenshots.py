"""Regenerate docs/img/review.png: the review page of the shared labeled photos in headless chromium.

    .venv/bin/python docs/screenshots.py [--faces ../shared/data/faces] [--work /tmp/refface-docs]

Builds (or reuses) an FFHQ-Ref-style root of the photos, writes its review page with the photos'
labels, opens it from disk, walks to the second face of the first identity with the keyboard, marks
one face dropped and one split off, and saves a 1280x900 screenshot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    parser.add_argument("--work", type=Path, default=Path("/tmp/refface-docs"))
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "review.png")
    args = parser.parse_args()

    import shutil

    from common.cdp import Browser, find_chromium
    from common.faces_root import build_faces_root

    from refface.builders.ffhq_ref import FFHQRefConfig, build_ffhq_ref
    from refface.review.data import ReviewConfig
    from refface.review.page import write_review

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("chromium not found (apt-get install -y chromium)")
    root = args.work / "faces-ref"
    if not root.exists():
        shutil.copytree(build_faces_root(args.faces), root / "mined")
    labels = args.faces / "labels.csv"
    build_ffhq_ref(args.faces, root, FFHQRefConfig(detector="dlib", labels=str(labels), plots=False))
    write_review(root, ReviewConfig(labels=str(labels)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with Browser(chromium, args.work / "profile", width=1280, height=900) as browser:
        browser.open((root / "review" / "index.html").as_uri())
        browser.click("#clear")
        for key in ("l", "l", "l", "d", "l", "s", "h"):
            browser.key(key)
        browser.eval("new Promise(r => setTimeout(r, 1500))")  # thumbnails
        browser.screenshot(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
