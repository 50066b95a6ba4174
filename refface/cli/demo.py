"""``refface demo``: the whole pipeline end to end on the default input."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import typer

from refface.cli.errors import exits_on_error
from refface.console import console, print_summary
from refface.demo_input import SampleUnavailable, resolve_sample_dir
from refface.manifests.layout import IDENTITIES, SPLITS, references_filename, split_filename


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def _labels_csv(images: Path) -> Path | None:
    path = images / "labels.csv"
    return path if path.exists() else None


def _dataset_labels(images: Path, out: Path) -> dict[str, str] | None:
    """path -> identity under the dataset's own image names (a build from photos names its crops
    and writes the labels under those names too); None when the input has no labels.csv."""
    import pandas as pd

    labels = _labels_csv(images)
    if labels is None:
        return None
    moved = out / "dataset" / "labels.csv"
    truth = pd.read_csv(moved if moved.exists() else labels, dtype=str, keep_default_na=False)
    return dict(zip(truth["path"], truth["identity"], strict=True))


def step_build(images: Path, out: Path, workers: int) -> dict:
    """Mine identities and build an FFHQ-Ref-style dataset root (photos: dlib detection)."""
    from refface.builders.ffhq_ref import FFHQRefConfig, build_ffhq_ref

    labels = _labels_csv(images)
    config = FFHQRefConfig(detector="dlib", workers=workers, labels=str(labels) if labels else None)
    summary = build_ffhq_ref(images, out / "dataset", config)
    return {
        "dataset root": summary["root"],
        "images / identities / lone faces": f"{summary['images']} / {summary['identities']} / {summary['singletons']}",
        "targets train/val/test": "/".join(str(summary[f"{s}_targets"]) for s in SPLITS),
        "errors": summary["errors"],
    }


def step_scores(images: Path, out: Path, workers: int) -> dict:
    """Score the identity clusters against labels.csv when the input has one."""
    import pandas as pd

    from refface.mining.metrics import evaluate_assignments

    truth = _dataset_labels(images, out)
    if truth is None:
        return {"cluster scores": "skipped (no labels.csv in the input)"}
    ids = pd.read_parquet(out / "dataset" / IDENTITIES)
    scores = evaluate_assignments(dict(zip(ids["path"], ids["identity"].astype(int), strict=True)), truth)
    return {
        "pairwise F": round(scores.pairwise_f, 4),
        "BCubed F": round(scores.bcubed_f, 4),
        "clusters / identities": f"{scores.n_clusters} / {scores.n_identities}",
    }


def step_scale(images: Path, out: Path, workers: int) -> dict:
    """The scale-out path in small: Ray mining straight into shards, then the sharded IVF-PQ k-NN
    graph and sparse clustering of every face, scored against the dense clustering and labels."""
    import numpy as np
    import pandas as pd

    from refface.manifests.embedding_shards import ShardedEmbeddings
    from refface.manifests.embeddings import load_embeddings, shard_embeddings
    from refface.manifests.io import list_images
    from refface.mining.cluster import default_threshold
    from refface.mining.metrics import evaluate_assignments, explode_singletons, pairwise_prf
    from refface.mining.pipeline import MiningConfig, mine_folder
    from refface.mining.sharded import cluster_sharded, sharded_knn

    rows: dict[str, object] = {}
    # 1. Mining on Ray Data, written as one shard per partition of 2 chunks of 8 photos.
    subset = list_images(images)[:48]
    try:
        from refface.executors import connect_ray

        ray = connect_ray(num_cpus=workers)
        executor = "ray"
    except ImportError:
        ray, executor = None, "local"
    try:
        config = MiningConfig(workers=workers, chunk_size=8, executor=executor, shard_rows=16)
        mined = mine_folder(images, out / "scale" / "mined", config, relpaths=subset)
    finally:
        if ray is not None:
            ray.shutdown()
    reader = ShardedEmbeddings(out / "scale" / "mined" / "embeddings_shards")
    rows["sharded mining"] = (
        f"{mined.n_faces} faces of {len(subset)} photos on {executor}: {reader.n_shards} shards"
    )
    # 2. Every face of the dataset: sharded IVF-PQ graph (re-ranked exactly), sparse clustering.
    root = out / "dataset"
    emb = load_embeddings(root)
    shards = shard_embeddings(root, out / "scale" / "shards", rows_per_shard=256)
    tau = default_threshold(emb, "average")
    # Recall is counted on the edges average linkage reads: those within twice the threshold.
    knn_dir = out / "scale" / "knn"
    result = sharded_knn(
        shards, knn_dir, k=16, kind="ivf_pq", rerank=8, recall_sample=100, recall_radius=2 * tau
    )
    labels = cluster_sharded(result, tau, "average")
    dense = pd.read_parquet(root / IDENTITIES).set_index("path")["identity"]
    dense_labels = explode_singletons(dense.loc[emb.paths].to_numpy())
    _, _, agree = pairwise_prf(dense_labels, explode_singletons(labels))
    rows["k-NN graph"] = (
        f"{result.plan.kind}, {shards.n_shards} shards, edge recall {result.recall.get('edge_recall')} "
        f"(held out vs exact)"
    )
    rows["sparse vs dense clustering (pair F)"] = round(agree, 4)
    truth = _dataset_labels(images, out)
    if truth is not None:
        scores = evaluate_assignments(dict(zip(emb.paths, np.asarray(labels).tolist(), strict=True)), truth)
        rows["sparse clustering pairwise F"] = round(scores.pairwise_f, 4)
    return rows


def step_degrade(images: Path, out: Path, workers: int) -> dict:
    """Write the ReF-LDM severe and moderate LQ test sets and fill the CSVs' lq_image column."""
    from refface.builders.degrade_sets import DegradeConfig, degrade_target

    config = DegradeConfig(presets=("refldm-severe", "refldm-moderate"), workers=workers)
    result = degrade_target(out / "dataset", config)
    return {s["set"]: f"{s['images']} images in {s['folder']}" for s in result["sets"]}


def step_review(images: Path, out: Path, workers: int) -> dict:
    """Write the identity review page of the dataset root (with the input's labels when it has them)."""
    from refface.review.data import ReviewConfig
    from refface.review.page import write_review

    labels = _labels_csv(images)
    summary = write_review(
        out / "dataset", ReviewConfig(workers=workers, labels=str(labels) if labels else None)
    )
    return {
        "review page": summary["page"],
        "possible same person": f"{summary['possible same person pairs']} cluster pairs, "
        f"{summary['identities holding two or more labels']} identities holding two labels",
    }


def step_export_hf(images: Path, out: Path, workers: int) -> dict:
    """Export the dataset root as a Hugging Face dataset folder (Parquet shards, README card)."""
    from refface.export.hf import export_hf

    summary = export_hf(out / "dataset", out / "hf")
    rows = "/".join(str(summary.get(f"{s} rows", 0)) for s in ("train", "val", "test"))
    return {"Hugging Face dataset": f"{out / 'hf'} ({rows} rows train/val/test, {summary['shards']} shards)"}


def step_audit(images: Path, out: Path, workers: int) -> dict:
    """Audit identity leakage between the train and test splits."""
    from refface.audit.config import AuditConfig
    from refface.audit.run import audit_sets

    root = out / "dataset"
    summary = audit_sets(
        {"train": root / split_filename("train"), "test": root / split_filename("test")},
        out / "audit",
        AuditConfig(workers=workers, max_leak_rate=1.0),
    )
    return {"audit report": str(out / "audit" / "report.html"), "audit passed": summary.get("passed")}


def step_attributes(images: Path, out: Path, workers: int) -> dict:
    """Score the attribute vocabulary with the CLIP backend (a tiny random CLIP: the pipeline, not
    the scores) into attributes.parquet, whose prompts the shards and MGFR's training carry."""
    from refface.mining.attributes import AttributesConfig, run_attributes
    from refface.mining.tiny_clip import save_tiny_clip

    clip = out / "tiny-clip"
    if not (clip / "config.json").exists():
        save_tiny_clip(clip)
    manifest, _ = run_attributes(out / "dataset", AttributesConfig(backend="clip", clip_model=str(clip)))
    return {
        "attributes (tiny CLIP)": f"{manifest.get('rows')} rows in {out / 'dataset' / 'attributes.parquet'}"
    }


def step_shards(images: Path, out: Path, workers: int) -> dict:
    """Pack the train split into WebDataset shards and verify them against their index."""
    from refface.builders.shards import ShardsConfig, write_shards
    from refface.manifests.webdataset import verify_shards

    write_shards(out / "dataset", out / "shards", ShardsConfig(split="train", workers=workers))
    report = verify_shards(out / "shards")
    return {"shards": f"{report['samples']} samples in {report['shards']} shard(s) at {out / 'shards'}"}


def _config(name: str) -> str:
    import refface

    return str(Path(refface.__file__).resolve().parents[1] / "configs" / name)


def step_train_refldm(images: Path, out: Path, workers: int) -> dict:
    """Train a tiny ReF-LDM (VQGAN, LQ-only LDM, then ReF-LDM with CacheKV) for a few steps."""
    import torch
    import yaml

    from refface.train.refldm.identity import iresnet
    from refface.train.refldm.train import main, parse_args

    # No ArcFace weights ship with refface: the smoke run's identity loss uses a tiny random iresnet.
    config = yaml.safe_load(Path(_config("refldm_tiny.yaml")).read_text())
    arcface = out / "arcface_tiny_random.pth"
    if not arcface.exists():
        torch.manual_seed(0)
        task = config["task"]
        torch.save(iresnet(task["arcface_arch"], widths=tuple(task["arcface_widths"])).state_dict(), arcface)
    config["task"]["arcface"] = str(arcface)
    config_path = out / "refldm_demo.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    logs = []
    for stage in ("vqgan", "ldm", "refldm"):
        argv = ["--config", str(config_path), "--dataset", str(out / "shards")]
        logs = main(parse_args([*argv, "--stage", stage, "--output", str(out / "refldm")]))
    last = f"{logs[-1]['loss']:.4f}" if logs else "up to date"
    return {"ReF-LDM (tiny) run": str(out / "refldm"), "ReF-LDM last loss": last}


def _resized_targets(images: Path, csv: Path, restored: Path, out: Path) -> Path:
    """GT copies at the restored images' size: the tiny demo model restores at 32², not at 512²."""
    import cv2

    from refface.manifests.io import read_image, write_png
    from refface.manifests.references import read_references

    for gt_name in read_references(csv)["gt_image"]:
        rel = Path(gt_name).with_suffix(".png")
        if (out / rel).exists() or not (restored / rel).exists():
            continue
        size = read_image(restored / rel).shape[1::-1]
        write_png(out / rel, cv2.resize(read_image(images / gt_name), size, interpolation=cv2.INTER_AREA))
    return out


def step_restore_evaluate(images: Path, out: Path, workers: int) -> dict:
    """Restore the severe LQ test set with the tiny ReF-LDM, then score it against the GT."""
    from refface.evaluation.evaluate import evaluate_folders
    from refface.train.refldm.restore import restore_folder

    root = out / "dataset"
    lq_sets = sorted((root / "lq").glob("severe_*"))
    restored = out / "restored" / "refldm"
    counts = restore_folder(
        lq_sets[0],
        restored,
        checkpoint=out / "refldm",
        references=root / references_filename("test"),
        steps=10,
    )
    from refface.manifests.root import DatasetRoot

    image_root = DatasetRoot(root).image_root() or root
    gt = _resized_targets(image_root, root / references_filename("test"), restored, out / "gt-resized")
    result = evaluate_folders(restored, gt, refs_csv=root / references_filename("test"), out=out / "metrics")
    return {
        "restored (ReF-LDM)": f"{counts['restored'] + counts['skipped']} images in {restored}",
        "metrics table": str(out / "metrics" / "metrics.md"),
        "PSNR / SSIM": " / ".join(f"{result.metrics.get(m, float('nan')):.3f}" for m in ("psnr", "ssim")),
    }


def step_whole_photo(images: Path, out: Path, workers: int) -> dict:
    """Restore every face of one whole photo with the tiny ReF-LDM and paste them back."""
    from refface.manifests.io import list_images
    from refface.train.refldm.whole_photo import restore_photos

    names = list_images(images)
    several = [n for n in names if "whole_imgs" in n and "10045" in n]  # a photo of several people
    photo = images / (several[0] if several else names[0])
    refs = [images / n for n in names if n != str(photo.relative_to(images))][:2]
    counts = restore_photos(photo, out / "whole_photo", checkpoint=out / "refldm", refs=refs, steps=4)
    return {"whole photo (ReF-LDM)": f"{counts['faces']} faces pasted back into {out / 'whole_photo'}"}


def step_train_mgfr(images: Path, out: Path, workers: int) -> dict:
    """Train MGFR stage 1 and 2 for a few steps on a tiny random Stable Diffusion."""
    from refface.train.mgfr.tiny_sd import save_tiny_sd
    from refface.train.mgfr.train import main, parse_args

    sd = out / "tiny-sd"
    if not (sd / "model_index.json").exists():
        save_tiny_sd(sd)
    logs = []
    for stage in ("1", "2"):
        argv = ["--config", _config("mgfr_tiny.yaml"), "--dataset", str(out / "shards"), "--sd", str(sd)]
        logs = main(parse_args([*argv, "--stage", stage, "--output", str(out / "mgfr")]))
    last = f"{logs[-1]['loss']:.4f}" if logs else "up to date"
    # One image restored with typed attributes (prompt and negative-attribute prompt composed from them).
    from refface.train.mgfr.restore import restore_folder

    lq_sets = sorted((out / "dataset" / "lq").glob("severe_*"))
    lq = next(iter(sorted(lq_sets[0].rglob("*.png"))), None) if lq_sets else None
    restored = {}
    if lq is not None:
        restored = restore_folder(
            lq,
            out / "mgfr-restored",
            checkpoint=out / "mgfr" / "stage1",
            sd=sd,
            steps=2,
            device="cpu",
            attributes="blue eyes, beard",
        )
    return {
        "MGFR (tiny) run": str(out / "mgfr"),
        "MGFR last loss": last,
        "MGFR restore --attributes 'blue eyes, beard'": f"{restored.get('restored', 0)} image(s) in {out / 'mgfr-restored'}",
    }


def step_doctor(images: Path, out: Path, workers: int) -> dict:
    """What this install runs on (refface doctor, without hashing weights); the report as JSON."""
    import json

    from refface.doctor import collect
    from refface.manifests.atomic import write_json

    report = collect(verify=False)
    write_json(out / "doctor.json", json.loads(json.dumps(report.to_dict(), default=str)))
    ort = report.onnxruntime
    return {
        "GPUs": ", ".join(report.gpus) or "none",
        "onnxruntime providers": ", ".join(ort.get("providers", [])) or "not installed",
        "FAISS GPUs": report.faiss.get("gpus", 0),
        "doctor warnings": len(report.warnings),
        "doctor report": str(out / "doctor.json"),
    }


STEPS: list[tuple[str, Callable[[Path, Path, int], dict]]] = [
    ("check devices and weights (refface doctor)", step_doctor),
    ("build FFHQ-Ref-style dataset", step_build),
    ("score clusters", step_scores),
    ("degrade test sets", step_degrade),
    ("identity review page", step_review),
    ("export Hugging Face dataset", step_export_hf),
    ("audit leakage", step_audit),
    ("attributes (CLIP vocabulary, tiny random CLIP)", step_attributes),
    ("write WebDataset shards", step_shards),
    ("scale-out: Ray, sharded embeddings, sharded k-NN graph", step_scale),
    ("train ReF-LDM (tiny)", step_train_refldm),
    ("restore and evaluate", step_restore_evaluate),
    ("restore a whole photo", step_whole_photo),
    ("train MGFR (tiny)", step_train_mgfr),
]


@exits_on_error(code=1, errors=(SampleUnavailable,))
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Folder that receives every result."),
    data: Path | None = typer.Option(
        None, help="Folder of face photos (default: $REFFACE_SAMPLE_DIR, else LFW fetched once)."
    ),
    workers: int = typer.Option(2, help="Worker processes for CPU stages."),
) -> None:
    """Run every pipeline stage on a small default input and print where the results are.

    Steps: mine identities and build an FFHQ-Ref-style dataset, score the clusters (when the input
    has labels.csv), write the severe/moderate LQ test sets, write the identity review page, export a
    Hugging Face dataset folder, audit train/test leakage, write
    WebDataset shards, run the scale-out path (Ray mining into embedding shards, sharded IVF-PQ
    k-NN graph, sparse clustering), and train tiny ReF-LDM and MGFR models for a few steps, then restore and
    evaluate, and restore every face of a whole photo. Rerunning skips finished work.
    """
    images = resolve_sample_dir(data)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"input": str(images)}
    for title, step in STEPS:
        console.rule(f"[bold]{title}")
        start = time.perf_counter()
        results.update(step(images, out, workers))
        results[f"time: {title}"] = f"{time.perf_counter() - start:.1f} s"
    print_summary(f"refface demo — results in {out}", results)
