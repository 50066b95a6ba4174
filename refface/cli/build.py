"""``refface build ffhq-ref|celeba-test-ref|reface-hq``, ``refface validate`` and ``refface degrade``."""

from __future__ import annotations

from pathlib import Path

import typer

from refface.cli.errors import exits_on_error
from refface.mining.tta import DEFAULT_TTA


def register(app: typer.Typer) -> None:
    app.add_typer(build_app, name="build")
    app.command("validate")(validate)
    app.command("degrade")(degrade)


build_app = typer.Typer(
    help="Build reference datasets (FFHQ-Ref, CelebA-Test-Ref, Reface-HQ-style) with identity-disjoint splits.",
    no_args_is_help=True,
)


def resolve_embedder_name(name: str, model: Path | None) -> str:
    from refface.mining.embed import resolve_embedder_name as resolve

    return resolve(name, model)


def _opt(path: Path | None) -> str | None:
    return str(path) if path else None


# Options shared by the builders (typer needs them spelled out per command).
DETECTOR_HELP = (
    "Face detector: prealigned (FFHQ-aligned crops, no detection), dlib (offline) or scrfd (ONNX)."
)
EMBEDDER_HELP = (
    "Embedder: dlib (offline, 128-d), arcface (insightface ONNX, 512-d; ReF-LDM's choice) or auto "
    "(arcface when its weights are found with --model or in insightface's model root, else dlib)."
)
MODEL_HELP = "Embedder weights: an ArcFace .onnx (or a folder holding one) or a dlib .dat."
TTA_HELP = (
    "Test-time augmentation of the embedder: flip (each aligned crop and its mirror, averaged; "
    "1.6x the embedding time, better clusters, see docs/mining.md) or none."
)
THRESHOLD_HELP = "Same-identity cosine distance (default: none for the impostor clustering, which sets each face's radius from the set itself; fixed-cut methods use the embedder's bar, e.g. ArcFace 0.4, dlib 0.075 with average linkage)."
MAX_FALSE_MERGE_HELP = "impostor clustering: share of same-identity pairs the set's impostor model may expect to be strangers (precision target; lower = stricter; default: the embedder's, dlib 0.45, ArcFace 0.1)."
CORRECTIONS_HELP = (
    "Reviewed corrections.csv (path, action, value) from `refface review`, applied to the identities "
    "before splits and references; rows that match nothing are listed in build.json and card.md."
)
NEAR_DUP_HELP = (
    "Val/test references closer than this to the target are near-duplicates (default: threshold/4)."
)


@build_app.command("ffhq-ref")
@exits_on_error()
def ffhq_ref(
    images: Path = typer.Argument(
        ..., help="Face images: FFHQ images1024x1024 (nested 00000/00000.png or flat)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset root that receives every output."),
    detector: str = typer.Option("prealigned", help=DETECTOR_HELP + " Use dlib for ordinary photos."),
    prealigned: bool = typer.Option(
        False,
        "--prealigned",
        help="Declare the inputs FFHQ-aligned (same as --detector prealigned): used as they are. With a "
        "detector, photos are written as FFHQ-aligned crops (aligned/<stem>.png, --crop-size) and the CSVs "
        "point at them; a photo already on the FFHQ template is only resized.",
    ),
    embedder: str = typer.Option("auto", help=EMBEDDER_HELP),
    model: Path | None = typer.Option(None, help=MODEL_HELP),
    tta: str = typer.Option(DEFAULT_TTA, help=TTA_HELP),
    model_root: Path | None = typer.Option(None, help="Folder holding det_10g.onnx for --detector scrfd."),
    dlib_detector: str = typer.Option("hog", help="dlib detector: hog (fast) or mmod (CNN)."),
    face_policy: str = typer.Option("largest_central", help="Face kept when several are found."),
    crop_size: int = typer.Option(512, help="Aligned crop side used for embedding."),
    cluster_method: str | None = typer.Option(
        None,
        help="Identity clustering (default: the embedder's, impostor): impostor, impostor_linkage, average, components, "
        "refldm (ReF-LDM's rule), chinese_whispers, infomap; see docs/mining.md.",
    ),
    identity_threshold: float | None = typer.Option(None, help=THRESHOLD_HELP),
    ref_order: str = typer.Option(
        "farthest",
        "--ref-order",
        help="Order of val/test references: farthest (farthest-point, the paper's), nearest or random. "
        "ReF-LDM's inference uses the first five.",
    ),
    max_false_merge: float | None = typer.Option(None, help=MAX_FALSE_MERGE_HELP),
    min_refs: int = typer.Option(2, help="A val/test target needs at least this many references."),
    max_refs: int = typer.Option(
        9, help="Keep at most this many val/test references (farthest-point order)."
    ),
    near_duplicate_distance: float | None = typer.Option(None, help=NEAR_DUP_HELP),
    within_threshold: bool = typer.Option(
        True, help="References must also lie within the identity threshold of the target itself."
    ),
    train_exclude_near_duplicates: bool = typer.Option(
        False, help="Drop near-duplicates from training lists too."
    ),
    seed: int = typer.Option(0, help="Split seed: the same seed gives byte-identical outputs."),
    val_fraction: float = typer.Option(300 / 6523, help="Share of identities in val (paper: 300 of 6,523)."),
    test_fraction: float = typer.Option(
        150 / 6523, help="Share of identities in test (paper: 150 of 6,523)."
    ),
    val_identities: int | None = typer.Option(
        None, help="Exact number of val identities (overrides the share)."
    ),
    test_identities: int | None = typer.Option(
        None, help="Exact number of test identities (overrides the share)."
    ),
    min_eval_size: int = typer.Option(3, help="Identities smaller than this stay in train."),
    balance_column: str | None = typer.Option(
        None, help="Balance test identities over this attribute (e.g. race)."
    ),
    attributes: Path | None = typer.Option(
        None, help="Attributes table (path + column); default ROOT/attributes.parquet."
    ),
    singleton_split: str = typer.Option("train", help="Split for images without an identity."),
    labels: Path | None = typer.Option(
        None, help="Known labels CSV (path, identity): the card reports precision."
    ),
    plots: bool = typer.Option(True, help="Draw the card's PNG plots."),
    corrections: Path | None = typer.Option(None, help=CORRECTIONS_HELP),
    workers: int = typer.Option(2, help="Worker processes for mining (outputs do not depend on it)."),
    chunk_size: int = typer.Option(32, help="Images per unit of work / resumable part file."),
) -> None:
    """Build an FFHQ-Ref-style dataset: identities, reference CSVs (ReF-LDM format), split lists, card.

    Writes into OUT: images/faces/embeddings tables, identities.parquet, splits.parquet,
    {train,val,test}_references.csv, {train,val,test}_image.txt (covering every input image), card.md with
    plots/ and build.json. Every stage is skipped when its inputs are unchanged; a killed build resumes.
    """
    from refface.builders.ffhq_ref import FFHQRefConfig, build_ffhq_ref
    from refface.console import print_summary

    config = FFHQRefConfig(
        detector="prealigned" if prealigned else detector,
        embedder=resolve_embedder_name(embedder, model),
        model_path=_opt(model),
        tta=tta,
        model_root=_opt(model_root),
        dlib_detector=dlib_detector,
        face_policy=face_policy,
        crop_size=crop_size,
        workers=workers,
        chunk_size=chunk_size,
        cluster_method=cluster_method,
        identity_threshold=identity_threshold,
        max_false_merge=max_false_merge,
        min_refs=min_refs,
        max_refs=max_refs,
        ref_order=ref_order,
        near_duplicate_distance=near_duplicate_distance,
        within_threshold=within_threshold,
        train_exclude_near_duplicates=train_exclude_near_duplicates,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        val_identities=val_identities,
        test_identities=test_identities,
        min_eval_size=min_eval_size,
        balance_column=balance_column,
        attributes=_opt(attributes),
        singleton_split=singleton_split,
        labels=_opt(labels),
        corrections=_opt(corrections),
        plots=plots,
    )
    summary = build_ffhq_ref(images, out, config)
    print_summary("refface build ffhq-ref", summary)


@build_app.command("celeba-test-ref")
@exits_on_error()
def celeba_test_ref(
    targets: Path = typer.Argument(..., help="Target HQ images (e.g. CelebA-Test HQ)."),
    pool: Path = typer.Argument(..., help="Reference pool searched for each target (e.g. all of CelebA-HQ)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset root that receives every output."),
    lq: Path | None = typer.Option(
        None, help="Folder of existing LQ images, matched to targets by file stem."
    ),
    detector: str = typer.Option("dlib", help=DETECTOR_HELP),
    embedder: str = typer.Option("auto", help=EMBEDDER_HELP),
    model: Path | None = typer.Option(None, help=MODEL_HELP),
    tta: str = typer.Option(DEFAULT_TTA, help=TTA_HELP),
    model_root: Path | None = typer.Option(None, help="Folder holding det_10g.onnx for --detector scrfd."),
    dlib_detector: str = typer.Option("hog", help="dlib detector: hog (fast) or mmod (CNN)."),
    crop_size: int = typer.Option(512, help="Aligned crop side used for embedding."),
    identity_threshold: float | None = typer.Option(None, help=THRESHOLD_HELP),
    ref_order: str = typer.Option(
        "farthest",
        "--ref-order",
        help="Order of val/test references: farthest (farthest-point, the paper's), nearest or random. "
        "ReF-LDM's inference uses the first five.",
    ),
    min_refs: int = typer.Option(2, help="A target needs at least this many references to be listed."),
    max_refs: int = typer.Option(9, help="Keep at most this many references (farthest-point order)."),
    near_duplicate_distance: float | None = typer.Option(None, help=NEAR_DUP_HELP),
    labels: Path | None = typer.Option(
        None, help="Known labels CSV (path, identity): the card reports precision."
    ),
    corrections: Path | None = typer.Option(None, help=CORRECTIONS_HELP),
    workers: int = typer.Option(2, help="Worker processes for mining (outputs do not depend on it)."),
) -> None:
    """Build a CelebA-Test-Ref-style test set: targets from TARGETS, references searched in POOL.

    The target itself and its near-duplicates (same file bytes or distance below the near-duplicate bar)
    are never references. Writes test_references.csv (lq_image points at --lq files when given),
    test_image.txt, card.md and build.json (image_root = TARGETS, ref_root = POOL, lq_root).
    """
    from refface.builders.celeba_test_ref import CelebATestRefConfig, build_celeba_test_ref
    from refface.console import print_summary

    config = CelebATestRefConfig(
        detector=detector,
        embedder=resolve_embedder_name(embedder, model),
        model_path=_opt(model),
        tta=tta,
        model_root=_opt(model_root),
        dlib_detector=dlib_detector,
        crop_size=crop_size,
        workers=workers,
        identity_threshold=identity_threshold,
        min_refs=min_refs,
        max_refs=max_refs,
        ref_order=ref_order,
        near_duplicate_distance=near_duplicate_distance,
        lq=_opt(lq),
        labels=_opt(labels),
        corrections=_opt(corrections),
    )
    summary = build_celeba_test_ref(targets, pool, out, config)
    print_summary("refface build celeba-test-ref", summary)


@build_app.command("reface-hq")
@exits_on_error()
def reface_hq(
    folders: Path = typer.Argument(
        ..., help="Identity folders: FOLDERS/<identity>/*.jpg (web photos, any size)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset root that receives every output."),
    detector: str = typer.Option("dlib", help=DETECTOR_HELP),
    embedder: str = typer.Option("auto", help=EMBEDDER_HELP),
    model: Path | None = typer.Option(None, help=MODEL_HELP),
    tta: str = typer.Option(DEFAULT_TTA, help=TTA_HELP),
    model_root: Path | None = typer.Option(None, help="Folder holding det_10g.onnx for --detector scrfd."),
    dlib_detector: str = typer.Option("hog", help="dlib detector: hog (fast) or mmod (CNN)."),
    face_policy: str = typer.Option("largest_central", help="Face kept when several are found."),
    crop_size: int = typer.Option(512, help="Side of the output FFHQ-style crops."),
    min_face_size: float | None = typer.Option(
        None,
        help="Reject faces whose box is smaller than this (source pixels, sqrt(w*h)); default crop size / 2.",
    ),
    min_det_score: float | None = typer.Option(
        None, help="Drop faces with a lower detector score (default: no bar)."
    ),
    min_sharpness: float | None = typer.Option(
        150.0, help="Reject blurred crops: face-region Laplacian variance at 256 px below this (0 = off)."
    ),
    niqe_params: Path | None = typer.Option(
        None, help="NIQE pristine model (niqe_pris_params.npz) for the --max-niqe filter."
    ),
    max_niqe: float | None = typer.Option(
        None, help="Reject crops with a higher NIQE (needs --niqe-params)."
    ),
    identity_threshold: float | None = typer.Option(None, help=THRESHOLD_HELP),
    outlier_ratio: float = typer.Option(
        1.0, help="Flag a photo whose median distance to its folder's other faces exceeds ratio x threshold."
    ),
    merge_ratio: float = typer.Option(
        1.0, help="Merge two folders when their mean cross distance is below ratio x threshold."
    ),
    near_duplicate_distance: float | None = typer.Option(None, help=NEAR_DUP_HELP),
    seed: int = typer.Option(0, help="Split seed."),
    ref_order: str = typer.Option(
        "farthest",
        "--ref-order",
        help="Order of val/test references: farthest (farthest-point, the paper's), nearest or random. "
        "ReF-LDM's inference uses the first five.",
    ),
    min_refs: int = typer.Option(2, help="A val/test target needs at least this many references."),
    max_refs: int = typer.Option(9, help="Keep at most this many val/test references."),
    labels: Path | None = typer.Option(
        None, help="Known labels CSV (path, identity): the card reports precision."
    ),
    corrections: Path | None = typer.Option(None, help=CORRECTIONS_HELP),
    workers: int = typer.Option(2, help="Worker processes for mining (outputs do not depend on it)."),
) -> None:
    """Build a Reface-HQ-style dataset from identity folders of web photos.

    Detects and aligns each photo's face to an FFHQ-style crop (OUT/images/<identity>/<n>.png). Rejects
    faces too small for the crop, blurred crops and (with --niqe-params) crops of poor NIQE, each an
    errors-table row with its reason (counted in card.md); drops photos far from their folder's other
    faces and exact/near duplicates (dropped.csv lists every removal with its reason), merges folders of
    the same person, then writes the reference CSVs, split lists, card.md and build.json like ffhq-ref.
    """
    from refface.builders.reface_hq import RefaceHQConfig, build_reface_hq
    from refface.console import print_summary

    config = RefaceHQConfig(
        detector=detector,
        embedder=resolve_embedder_name(embedder, model),
        model_path=_opt(model),
        tta=tta,
        model_root=_opt(model_root),
        dlib_detector=dlib_detector,
        face_policy=face_policy,
        crop_size=crop_size,
        min_face_size=min_face_size,
        min_det_score=min_det_score,
        min_sharpness=min_sharpness or None,
        niqe_params=_opt(niqe_params),
        max_niqe=max_niqe,
        identity_threshold=identity_threshold,
        outlier_ratio=outlier_ratio,
        merge_ratio=merge_ratio,
        near_duplicate_distance=near_duplicate_distance,
        seed=seed,
        min_refs=min_refs,
        max_refs=max_refs,
        ref_order=ref_order,
        labels=_opt(labels),
        corrections=_opt(corrections),
        workers=workers,
    )
    summary = build_reface_hq(folders, out, config)
    print_summary("refface build reface-hq", summary)


@exits_on_error()
def validate(
    root: Path = typer.Argument(..., help="Dataset root (built here, or a published FFHQ-Ref folder)."),
    images: Path | None = typer.Option(
        None, help="Image root of gt_image paths (default: build.json image_root)."
    ),
    refs: Path | None = typer.Option(
        None, help="Root of ref_image paths (default: build.json ref_root, else --images)."
    ),
    lq: Path | None = typer.Option(
        None, help="Root of lq_image paths (LQ files are checked only when known)."
    ),
    decode: bool = typer.Option(True, help="Decode every image, not only check that it exists."),
) -> None:
    """Check a reference dataset: files exist and decode, references share the target's identity,
    no target lists itself, no reference crosses a split, CSV columns and types are right.

    Exits with status 1 when anything is wrong, listing each problem.
    """
    from refface.builders.validate import validate_root
    from refface.console import console, print_summary

    report = validate_root(root, image_root=images, ref_root=refs, lq_root=lq, decode=decode)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    for problem in report.problems:
        console.print(f"[red]problem:[/red] {problem}")
    print_summary("refface validate", {**report.counts, "problems": len(report.problems)})
    if not report.ok:
        raise typer.Exit(1)
    console.print("[green]valid[/green]")


def _list_table():
    from rich.table import Table

    from refface.degradations import PRESETS

    def rng(r) -> str:
        return "-" if r is None else f"[{r[0]:g}, {r[1]:g}]"

    def values(v) -> str:
        return "{" + ", ".join(f"{x:g}" for x in v) + "}"

    table = Table(title="degradation presets", title_justify="left", show_lines=True)
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("set folder · ranges (blur σ, scale r, noise σ, JPEG q) · extras")
    for name in sorted(PRESETS):
        p = PRESETS[name]
        if p.grid is not None:
            g = p.grid
            ranges = f"σ {values(g['sigma_x'])} r {values(g['scale'])} n {values(g['noise'])} q {values(g['jpeg'])}"
        else:
            ranges = f"σ {rng(p.blur_sigma)} r {rng(p.downsample_range)} n {rng(p.noise_range)} q {rng(p.jpeg_range)}"
        extras = [p.description] if p.description else []
        if p.color_jitter_prob:
            extras.append(f"colour jitter p={p.color_jitter_prob:g}")
        if p.gray_prob:
            extras.append(f"gray p={p.gray_prob:g}")
        if p.poisson_scale_range:
            extras.append(f"poisson {rng(p.poisson_scale_range)}")
        table.add_row(name, "\n".join([p.set_name, ranges, "; ".join(extras)]))
    return table


@exits_on_error()
def degrade(
    target: Path | None = typer.Argument(
        None,
        help="Dataset root (with test_references.csv / val_references.csv) or any folder of images.",
    ),
    preset: list[str] = typer.Option(
        ["refldm-severe", "refldm-moderate"],
        "--preset",
        "-p",
        help="Preset name; repeat for several sets (see --list).",
    ),
    list_: bool = typer.Option(False, "--list", help="List the presets and their ranges, then exit."),
    out: Path | None = typer.Option(
        None, help="Output folder for the sets (default: <root>/lq, or <folder>_lq beside a folder)."
    ),
    workers: int = typer.Option(1, help="Worker processes."),
    seed: int = typer.Option(0, help="Seed; each image's draws come from (seed, preset, image path)."),
    presets_file: Path | None = typer.Option(
        None, "--presets-file", help="YAML file of custom presets (name -> fields, optional base: <preset>)."
    ),
    images: Path | None = typer.Option(
        None, help="Image root of gt_image paths when the dataset's build.json has no image_root."
    ),
    chunk_size: int = typer.Option(16, help="Images per resumable chunk."),
    exact: bool = typer.Option(
        False, help="Blur every pixel with OpenCV (BasicSR's exact calls) instead of the fused fast path."
    ),
) -> None:
    """Write LQ sets with named degradation presets, deterministically per image.

    For a dataset root the targets are the gt_image column of its test/val reference CSVs (under build.json's image_root); for a folder, every image in it. Each set goes to OUT/<set folder>/ (ReF-LDM names such as severe_b8-16_r8-32_n0-20_j30-100) with one PNG per target at its relative path, params.parquet/.csv (every sampled value), errors.parquet/.csv and manifest.json; the lq_image column of the reference CSVs is then filled in.

    Reruns skip finished sets and chunks; a killed run resumes and ends with the same bytes.
    """
    from refface.console import console, print_summary

    if presets_file is not None:
        from refface.degradations import load_presets_file

        loaded = load_presets_file(presets_file)
        console.print(f"loaded presets: {', '.join(sorted(loaded))}")
    if list_:
        console.print(_list_table())
        return
    if target is None:
        console.print("[red]give a TARGET (dataset root or folder), or --list")
        raise typer.Exit(2)
    from refface.builders.degrade_sets import DegradeConfig, degrade_target
    from refface.degradations import get_preset

    for name in preset:
        get_preset(name)
    config = DegradeConfig(
        presets=tuple(dict.fromkeys(preset)),
        seed=seed,
        workers=workers,
        chunk_size=chunk_size,
        fast=not exact,
    )
    summary = degrade_target(target, config, out=out, images=images)
    rows: list[tuple[str, object]] = [
        ("target", f"{summary['target']} ({summary['kind']})"),
        ("out", summary["out"]),
    ]
    for s in summary["sets"]:
        state = "written" if s["ran"] else "up to date"
        rows.append(
            (
                s["set"],
                f"{s['images']} images, {s['written']} new, {s['already_done']} resumed, "
                f"{s['errors']} errors, {s['seconds']:.1f} s ({state})",
            )
        )
    for csv in summary["csvs"]:
        rows.append(("lq_image filled", csv))
    print_summary("refface degrade", rows)
