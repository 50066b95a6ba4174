"""What ``--tta flip`` costs in the mining pipeline: faces/s of ``refface embed`` with and without it.

Mines the same ``--n`` photos of a folder (every ``len/n``-th path of the sorted list) into fresh
roots with ``MiningConfig(tta="none")`` and ``MiningConfig(tta="flip")`` (detection, alignment and
embedding, as ``refface embed`` runs them), ``--repeats`` times each in alternation, and reports
faces/s. With ``--compare ROOT`` the flip vectors are checked against a flip-embedded root of the
same folder (e.g. bench/reembed_tta.py's), row by row.

    python bench/tta_speed.py --n 160 --workers 2 --compare <flip root>

Results: bench/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lfw_dev"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--n", type=int, default=160, help="photos mined per run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compare", type=Path, default=None, help="a flip-embedded root of --data")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="tta_speed")
    args = parser.parse_args()
    os.environ.setdefault("REFFACE_PROGRESS", "0")

    from refface.manifests.embeddings import load_embeddings
    from refface.mining.pipeline import MiningConfig, mine_folder

    paths = sorted(
        p.relative_to(args.data).as_posix()
        for p in args.data.rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    step = max(1, len(paths) // args.n)
    relpaths = paths[::step][: args.n]
    runs: dict[str, list[dict]] = {"none": [], "flip": []}
    loads = []
    flip_root = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for tta in ("none", "flip"):
                root = Path(tmp) / f"{tta}_{r}"
                loads.append(os.getloadavg()[0])
                t0 = time.perf_counter()
                res = mine_folder(
                    args.data, root, MiningConfig(workers=args.workers, tta=tta), relpaths=relpaths
                )
                seconds = time.perf_counter() - t0
                runs[tta].append({"faces": res.n_faces, "seconds": round(seconds, 2)})
                print(f"{tta}: {res.n_faces} faces in {seconds:.1f} s", flush=True)
                if tta == "flip":
                    flip_root = root
        report = {
            "data": str(args.data),
            "photos": len(relpaths),
            "workers": args.workers,
            "device": f"CPU: {os.cpu_count()} cores ({platform.processor() or platform.machine()})",
            "load_average_at_starts": [round(v, 2) for v in loads],
            "runs": runs,
        }
        for tta, rs in runs.items():
            faces, seconds = sum(x["faces"] for x in rs), sum(x["seconds"] for x in rs)
            report[f"faces_per_s_{tta}"] = round(faces / seconds, 2)
        report["flip_time_ratio"] = round(report["faces_per_s_none"] / report["faces_per_s_flip"], 2)
        if args.compare is not None and flip_root is not None:
            mined, ref = load_embeddings(flip_root), load_embeddings(args.compare)
            row = {p: i for i, p in enumerate(ref.paths)}
            diff = [
                float(np.abs(v - ref.vectors[row[p]]).max())
                for p, v in zip(mined.paths, mined.vectors, strict=True)
            ]
            report["compare"] = {
                "root": str(args.compare),
                "faces": len(diff),
                "max_abs_diff": max(diff),
                "tta": [mined.tta, ref.tta],
            }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Mining speed with and without `--tta flip` (bench/tta_speed.py)",
        "",
        f"`python bench/tta_speed.py --n {args.n} --workers {args.workers} --repeats {args.repeats}`: "
        f"{len(relpaths)} photos of {args.data.name}, dlib HOG detection + dlib embedding, "
        f"{args.workers} worker process(es), runs alternated; {report['device']}, load average at "
        f"the starts {report['load_average_at_starts']}.",
        "",
        "| tta | faces | seconds (per run) | faces/s |",
        "|---|---:|---|---:|",
    ]
    for tta, rs in runs.items():
        lines.append(
            f"| {tta} | {rs[0]['faces']} | {', '.join(str(x['seconds']) for x in rs)} | "
            f"{report[f'faces_per_s_{tta}']} |"
        )
    lines += ["", f"flip takes {report['flip_time_ratio']}x the time of plain mining."]
    if "compare" in report:
        c = report["compare"]
        lines.append(
            f"Flip vectors vs {c['root']}: {c['faces']} faces, largest absolute difference {c['max_abs_diff']:.2e}."
        )
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
