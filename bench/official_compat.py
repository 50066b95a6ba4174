"""Do ReF-LDM's own data loader and eval pairing accept a refface-built val/test set? (bench/results/official_compat.*)

Runs the official code from a ReF-LDM checkout (or its git directory) at run time, nothing copied:
``ldm/data/ir.py``'s ``ImageRestorationDataset`` as ``scripts/inference_dataset.py`` configures it
(given LQ, given references, first five, 512x512) over every val/test row; the result names that
inference writes (``Path(lq_image).stem + '.png'``); ``scripts/eval.py``'s pairing statements (its
glob of ``*.png`` and its ``assert (gt_dir / img_name).is_file()``) and its ``read_image``, compared
pixel for pixel with refface's reader; ``IdentityLoss.preprocess`` against refface's IDS input. Imports
of the official files that are not needed here (torchvision augmentations, the degradation module,
onnx2torch) are stubbed.

    .venv/bin/python bench/official_compat.py --official /path/to/ref-ldm --root out/demo/dataset \
        --lq out/demo/dataset/lq/severe_b8-16_r8-32_n0-20_j30-100
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def official_source(official: Path, rel: str) -> str:
    """A file of the official repository: from a checkout, else from a (bare) git directory's HEAD."""
    if (official / rel).is_file():
        return (official / rel).read_text()
    return subprocess.run(
        ["git", "--git-dir", str(official), "show", f"HEAD:{rel}"], check=True, capture_output=True, text=True
    ).stdout


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def load_official(official: Path) -> types.SimpleNamespace:
    """``ImageRestorationDataset``, eval.py's ``read_image`` and pairing statements, ``IdentityLoss``."""
    import torch

    if "ldm" not in sys.modules:
        _stub("ldm", __path__=[])
        _stub("ldm.data", __path__=[], degradations=_stub("ldm.data.degradations"))
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:  # noqa: BLE001 - only the augmentations use it, and they stay off
        _stub("torchvision", __path__=[], transforms=_stub("torchvision.transforms"))
    ir = types.ModuleType("official_ir")
    exec(compile(official_source(official, "ldm/data/ir.py"), "ldm/data/ir.py", "exec"), ir.__dict__)

    # eval.py runs its metrics at import: take only its read_image and its pairing statements.
    tree = ast.parse(official_source(official, "scripts/eval.py"))
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("read_image", "normalize")]
    loop = next(
        n
        for n in tree.body
        if isinstance(n, ast.For) and ast.unparse(n.target) in ("gt_dir, pred_dir", "(gt_dir, pred_dir)")
    )
    pairing = [s for s in loop.body if _assigns_img_names(s) or _is_assert_loop(s)]
    ev: dict = {"torch": torch, "np": np, "Path": Path}
    from PIL import Image

    ev["Image"] = Image
    exec(compile(ast.Module(body=keep, type_ignores=[]), "scripts/eval.py", "exec"), ev)
    pair_code = compile(ast.Module(body=pairing, type_ignores=[]), "scripts/eval.py", "exec")

    _stub("onnx2torch", convert=lambda path: None)
    idl: dict = {}
    exec(
        compile(
            official_source(official, "ldm/modules/losses/identity_loss.py"),
            "ldm/modules/losses/identity_loss.py",
            "exec",
        ),
        idl,
    )
    return types.SimpleNamespace(
        dataset=ir.ImageRestorationDataset,
        read_image=ev["read_image"],
        pairing=pair_code,
        pairing_text="\n".join(ast.unparse(s) for s in pairing),
        identity_loss=idl["IdentityLoss"],
    )


def _assigns_img_names(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Assign) and [ast.unparse(t) for t in stmt.targets] == ["img_names"]


def _is_assert_loop(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.For) and any(isinstance(s, ast.Assert) for s in stmt.body)


def run(official: Path, root: Path, lq_dir: Path, out: Path) -> dict:
    import pandas as pd
    import torch
    from PIL import Image

    from refface.evaluation.identity import official_input
    from refface.evaluation.protocol import read_official
    from refface.manifests.io import write_png

    off = load_official(official)
    build = json.loads((root / "build.json").read_text())
    image_root = Path(build["image_root"])
    gt_dir = root / "gt512"
    report: dict = {"root": str(root), "image_root": str(image_root), "lq_dir": str(lq_dir), "splits": {}}
    report["build"] = {
        "kind": build.get("kind"),
        "source_root": build.get("source_root", build["image_root"]),
        "images": build.get("inputs", {}).get("images"),
        "detector": build.get("config", {}).get("detector"),
    }
    pred_dir = out / "pred"
    import shutil

    shutil.rmtree(pred_dir, ignore_errors=True)  # results of an earlier set would pair wrongly
    for split in ("val", "test"):
        csv = root / f"{split}_references.csv"
        df = pd.read_csv(csv)
        ds = off.dataset(
            file_list=str(csv),
            gt_dir=str(image_root),
            lq_dir=str(lq_dir),
            ref_dir=str(image_root),
            use_given_lq=True,
            use_given_ref=True,
            max_num_refs=5,
            dup_to_max_num_refs=False,
            image_size=(512, 512),
        )
        shapes, stretched, names = set(), 0, []
        for i in range(len(ds)):
            item = ds[i]
            row = ds.df.iloc[i]
            for path in [row["gt_image"], row["lq_image"], *row["ref_image"]]:
                with Image.open(path) as img:
                    stretched += img.size != (512, 512)
            shapes.add((item["gt_image"].shape, item["lq_image"].shape, item["ref_image"].shape))
            name = Path(row["lq_image"]).stem  # inference_dataset.py's output name
            names.append(name)
            # Stand-in restoration: the LQ itself, saved where inference would save it.
            lq = np.clip(np.round((item["lq_image"] + 1) * 127.5), 0, 255).astype(np.uint8)
            write_png(pred_dir / split / f"{name}.png", lq)
        # eval.py's own pairing statements on the predictions and the flat GT folder.
        scope = {"pred_dir": pred_dir / split, "gt_dir": gt_dir, "sorted": sorted}
        exec(off.pairing, scope)
        paired = scope["img_names"]
        # eval.py's reader vs refface's on every pair (both sides, tensors in [0, 1]).
        max_diff = 0.0
        for img_name in paired:
            for folder in (pred_dir / split, gt_dir):
                theirs = off.read_image(folder / img_name)[0].permute(1, 2, 0).numpy() * 255
                ours = read_official(folder / img_name).astype(np.float32)
                max_diff = max(max_diff, float(np.abs(theirs - ours).max()))
        report["splits"][split] = {
            "rows": len(df),
            "dataset_items": len(ds),
            "shapes": sorted({f"gt {g}, lq {q}, refs {r}" for g, q, r in shapes}),
            "files_not_512": int(stretched),
            "unique_result_names": len(set(names)) == len(names),
            "eval_pairs": len(paired),
            "eval_assert_passed": True,
            "read_image_max_abs_diff_levels": max_diff,
        }
    # IDS input: IdentityLoss.preprocess vs refface's.
    loss = off.identity_loss.__new__(off.identity_loss)
    torch.nn.Module.__init__(loss)
    loss.center_crop, loss.resize_hw = True, (112, 112)
    sample = read_official(gt_dir / sorted(p.name for p in gt_dir.glob("*.png"))[0])
    theirs = loss.preprocess(torch.from_numpy(sample).permute(2, 0, 1)[None].float() / 255 * 2 - 1)
    report["ids_preprocess_max_abs_diff"] = float((theirs - official_input(sample)).abs().max())
    report["pairing_code"] = off.pairing_text
    return report


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "official_compat.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# ReF-LDM's own loader and eval pairing on a refface-built set",
        "",
        f"Dataset root `{report['root']}` (image root `{Path(report['image_root']).name}`), LQ set "
        f"`{Path(report['lq_dir']).name}`. Official code run from the fetched repository at run time "
        "(`python bench/official_compat.py`).",
        "",
        f"Build: `refface build {report['build']['kind']}` of {report['build']['images']} images from "
        f"`{report['build']['source_root']}` (detector {report['build']['detector']}).",
        "",
        "| split | CSV rows | ir.py items loaded | arrays (gt, lq, references side by side) | files not 512x512 (would be stretched) "
        "| result names unique | eval.py pairs (assert passed) | eval.py read_image vs refface (max abs levels) |",
        "|---|---:|---:|---|---:|---|---:|---:|",
    ]
    for split, r in report["splits"].items():
        lines.append(
            f"| {split} | {r['rows']} | {r['dataset_items']} | {'; '.join(r['shapes'])} | {r['files_not_512']} "
            f"| {r['unique_result_names']} | {r['eval_pairs']} ({r['eval_assert_passed']}) "
            f"| {r['read_image_max_abs_diff_levels']:.2g} |"
        )
    lines += [
        "",
        f"IdentityLoss.preprocess vs refface's IDS input: max abs difference {report['ids_preprocess_max_abs_diff']:.2g}.",
        "",
        "eval.py statements executed:",
        "",
        "```python",
        report["pairing_code"],
        "```",
    ]
    (out / "official_compat.md").write_text("\n".join(lines) + "\n")
    print((out / "official_compat.md").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, required=True, help="ReF-LDM checkout or git directory")
    ap.add_argument(
        "--root", type=Path, required=True, help="refface-built dataset root (val/test CSVs, gt512/)"
    )
    ap.add_argument("--lq", type=Path, required=True, help="an LQ set folder written by refface degrade")
    ap.add_argument("--work", type=Path, default=Path("/tmp/refface-official-compat"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    write(run(args.official, args.root, args.lq, args.work), args.out)


if __name__ == "__main__":
    main()
