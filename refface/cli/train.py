"""``refface train mgfr|refldm``, ``refface restore`` and ``refface evaluate``: training, inference and
metrics of both restoration models."""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import typer

from refface.cli.errors import exits_on_error


def register(app: typer.Typer) -> None:
    train_app.command("mgfr")(train_mgfr)
    train_app.command("refldm")(train_refldm)
    app.add_typer(train_app, name="train")
    app.command("restore")(restore)
    app.command("evaluate")(evaluate_cmd)


train_app = typer.Typer(
    name="train",
    help="Train a restoration model (MGFR or ReF-LDM) with the shared accelerate loop.",
    no_args_is_help=True,
)


# --model -> "module:function" with the signature restore_folder(input_dir, output_dir, *, checkpoint, ...).
# Options given on the command line are passed only when the function accepts them.
RESTORERS = {
    "mgfr": "refface.train.mgfr.restore:restore_folder",
    "refldm": "refface.train.refldm.restore:restore_folder",
}


@exits_on_error()
def restore(
    input_path: Path | None = typer.Argument(
        None, help="Photo or folder to restore (same as --input); with --whole-photo, unaligned photos."
    ),
    model: str | None = typer.Option(
        None, help=f"Which model restores: {', '.join(RESTORERS)} (--whole-photo: refldm)."
    ),
    input_dir: Path | None = typer.Option(
        None, "--input", help="Folder of aligned LQ face images (MGFR: or one image)."
    ),
    output_dir: Path = typer.Option(..., "--output", help="Where restored PNGs go (same relative names)."),
    whole_photo: bool = typer.Option(
        False,
        "--whole-photo",
        help="ReF-LDM: detect and FFHQ-align every face of each photo, restore it, paste it back (soft mask).",
    ),
    refs: list[Path] | None = typer.Option(
        None,
        "--refs",
        help="With --whole-photo: a reference photo (aligned or not) or folder of them; repeat for more. "
        "See --ref-match for photos of several people.",
    ),
    ref_match: str = typer.Option(
        "nearest",
        help="With --whole-photo: 'nearest' gives each reference to the face it resembles most "
        "(identity embeddings; faces no reference resembles get none), 'all' gives every face every reference.",
    ),
    detector: str = typer.Option("dlib", help="With --whole-photo: face detector (dlib or scrfd)."),
    detector_model: Path | None = typer.Option(
        None, help="With --whole-photo: detector weights (scrfd ONNX)."
    ),
    checkpoint: Path = typer.Option(..., help="Checkpoint folder, or a run folder (its latest checkpoint)."),
    references: Path | None = typer.Option(None, help="Folder of references named like the inputs."),
    sd: Path | None = typer.Option(None, help="MGFR: the local diffusers SD folder used in training."),
    prompt: str | None = typer.Option(None, help="MGFR: attribute prompt for every image."),
    preset: str | None = typer.Option(
        None,
        help="ReF-LDM: sampling preset, 'official' (the release's inference: DDIM trailing 50 steps, CFG 1.5, "
        "joint references, seed 2024) or 'refface' (100 leading steps); default: the model's "
        "(official for converted release weights).",
    ),
    attributes: str | None = typer.Option(
        None,
        help='MGFR: typed attributes ("blue eyes, beard"; they also give the negative-attribute prompt) '
        "or a per-image table (.parquet/.csv: path + prompt[, negative_attribute_prompt] or attributes).",
    ),
    steps: int | None = typer.Option(None, help="Sampling steps (model default when omitted)."),
    guidance_scale: float | None = typer.Option(
        None, help="ReF-LDM: CFG scale toward the references (default: the preset's)."
    ),
    w_quality: float | None = typer.Option(
        None, help="MGFR: negative-quality guidance weight (default 1.5; 0 skips that pass)."
    ),
    w_attribute: float | None = typer.Option(
        None, help="MGFR: negative-attribute guidance weight (default 1.0; 0 skips that pass)."
    ),
    negative_attribute_prompt: str | None = typer.Option(None, help="MGFR: attributes to steer away from."),
    embedder: str | None = typer.Option(
        None,
        help="MGFR: identity embedder for references (arcface, dlib); --whole-photo: the one matching "
        "references to faces (default dlib).",
    ),
    embedder_model: Path | None = typer.Option(None, help="Embedder weights (ArcFace ONNX path)."),
    tta: str | None = typer.Option(
        None,
        help="Test-time augmentation of that embedder: flip (default, as refface embed mines) or none "
        "(for a training set mined with --tta none).",
    ),
    batch_size: int | None = typer.Option(None, help="Images per sampling batch."),
    seed: int | None = typer.Option(
        None, help="Base seed (default: the model's; 0, or 2024 for the ReF-LDM official preset)."
    ),
    device: str | None = typer.Option(None, help="torch device (default: cuda when available, else cpu)."),
) -> None:
    """Restore a folder of aligned LQ faces with a trained MGFR or ReF-LDM checkpoint, or whole photos.

    `refface restore PHOTO_OR_FOLDER --whole-photo --refs REF [--refs REF ...] --checkpoint DIR --output OUT`
    finds every face, aligns it to the FFHQ template, restores it with ReF-LDM and the references, and
    pastes it back with a soft mask; the rest of the photo is unchanged.
    Reruns skip images already restored; unreadable inputs are listed in <output>/errors.csv.
    """
    from refface.console import print_summary

    if input_path is not None and input_dir is not None and input_path != input_dir:
        raise typer.BadParameter("give the input once: as an argument or with --input")
    input_dir = input_path or input_dir
    if input_dir is None:
        raise typer.BadParameter("missing the photo or folder to restore (argument or --input)")
    if whole_photo:
        if model not in (None, "refldm"):
            raise typer.BadParameter("--whole-photo restores with --model refldm", param_hint="--model")
        from refface.train.refldm.whole_photo import restore_photos

        counts = restore_photos(
            input_dir,
            output_dir,
            checkpoint=checkpoint,
            refs=refs,
            detector=detector,
            detector_model=detector_model,
            preset=preset,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            device=device,
            ref_match=ref_match,
            embedder=embedder or "dlib",
            embedder_model=embedder_model,
            **({"tta": tta} if tta else {}),
        )
        print_summary("refface restore --whole-photo", {"output": str(output_dir), **counts})
        return
    if refs:
        raise typer.BadParameter("--refs applies to --whole-photo; use --references for aligned inputs")
    if model is None:
        raise typer.BadParameter(f"choose one of {', '.join(RESTORERS)}", param_hint="--model")
    if model not in RESTORERS:
        raise typer.BadParameter(
            f"unknown model {model!r}; choose one of {', '.join(RESTORERS)}", param_hint="--model"
        )
    module_name, func_name = RESTORERS[model].split(":")
    try:
        fn = getattr(importlib.import_module(module_name), func_name)
    except ImportError as exc:
        raise typer.BadParameter(
            f"the {model} restorer is not available: {exc}", param_hint="--model"
        ) from exc
    options = {
        "references": references,
        "preset": preset,
        "sd": sd,
        "prompt": prompt,
        "attributes": attributes,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "w_quality": w_quality,
        "w_attribute": w_attribute,
        "negative_attribute_prompt": negative_attribute_prompt,
        "embedder": embedder,
        "embedder_model": embedder_model,
        "tta": tta,
        "batch_size": batch_size,
        "seed": seed,
        "device": device,
    }
    accepted = inspect.signature(fn).parameters
    given = {k: v for k, v in options.items() if v is not None}
    unsupported = sorted(k for k in given if k not in accepted and k != "seed")
    if unsupported:
        flags = ", ".join("--" + k.replace("_", "-") for k in unsupported)
        raise typer.BadParameter(f"{flags} do(es) not apply to --model {model}")
    kwargs = {k: v for k, v in given.items() if k in accepted}
    missing = [
        n
        for n, p in accepted.items()
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and n != "checkpoint" and n not in kwargs
    ]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise typer.BadParameter(f"--model {model} needs {flags}")
    counts = fn(input_dir, output_dir, checkpoint=checkpoint, **kwargs)
    print_summary(f"refface restore --model {model}", {"output": str(output_dir), **(counts or {})})


@exits_on_error()
def train_mgfr(
    config: Path = typer.Option(
        Path("configs/mgfr_sd15.yaml"), help="YAML config (loop, mgfr, stage1/stage2)."
    ),
    dataset: str = typer.Option(
        ..., help="Dataset root or shard folder/pattern (the input pipeline's source)."
    ),
    sd: Path = typer.Option(
        ..., help="Local diffusers Stable Diffusion 1.x/2.x folder (nothing is downloaded)."
    ),
    stage: int = typer.Option(
        1, min=1, max=2, help="1: text + LQ (LCA); 2: adds reference + identity (RCA)."
    ),
    output: Path = typer.Option(Path("out/mgfr"), help="Run folder; stage N writes <output>/stage<N>."),
    init_from: Path | None = typer.Option(
        None, help="Stage 2: stage-1 checkpoint or run folder (default <output>/stage1)."
    ),
    max_steps: int | None = typer.Option(None, help="Override loop.max_steps."),
    resume: str | None = typer.Option(
        None, help="'latest' (config default), a checkpoint folder, or 'none'."
    ),
    mixed_precision: str | None = typer.Option(None, help="Override loop.mixed_precision: no, fp16 or bf16."),
    overrides: list[str] | None = typer.Argument(
        None,
        metavar="[KEY=VALUE]...",
        help="Override any config field: loop.max_steps=100 loop.report_to=wandb,tensorboard ...",
        show_default=False,
    ),
) -> None:
    """Train MGFR stage 1 or 2: LCA/RCA adapters on a frozen Stable Diffusion.

    Resumes from the stage's latest checkpoint by default. This runs on one device; for several GPUs or
    nodes use `accelerate launch -m refface.train.mgfr.train` with the same flags (`make train-mgfr`).
    """
    from refface.console import print_summary
    from refface.train.mgfr.train import MGFRRun, main

    run = MGFRRun(
        config=str(config),
        dataset=dataset,
        sd=str(sd),
        stage=stage,
        output=str(output),
        init_from=str(init_from) if init_from is not None else None,
        max_steps=max_steps,
        resume=resume,
        mixed_precision=mixed_precision,
        overrides=tuple(overrides or ()),
    )
    logs = main(run)
    rows = {"stage": stage, "output": str(output / f"stage{stage}"), "steps run": len(logs)}
    if logs:
        rows.update({"last step": logs[-1]["step"], "last loss": f"{logs[-1]['loss']:.4f}"})
    print_summary("MGFR training", rows)


@exits_on_error()
def train_refldm(
    dataset: str = typer.Option(
        ..., "--dataset", help="Dataset root or shard folder (refface.train.loaders reads it)."
    ),
    stage: str = typer.Option(
        "refldm", "--stage", help="vqgan (A: autoencoder), ldm (B: LQ only) or refldm (C)."
    ),
    output: Path = typer.Option(
        Path("out/refldm"), "--output", help="Run folder; the stage writes <output>/<stage>/."
    ),
    config: Path = typer.Option(
        Path("configs/refldm.yaml"), "--config", help="YAML config (model, task, data, loop)."
    ),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Override loop.max_steps."),
    resume: str | None = typer.Option(None, "--resume", help="'latest', a checkpoint folder, or 'none'."),
    init: Path | None = typer.Option(
        None,
        "--init",
        help="Start from a model folder (unet/, vqgan/), e.g. one written by `refface convert refldm-official`: "
        "its UNet initialises stage C (or B) and its autoencoder is used frozen.",
    ),
    overrides: list[str] | None = typer.Argument(
        None,
        metavar="[KEY=VALUE]...",
        help="Override any config field: loop.max_steps=100 loop.report_to=wandb,tensorboard ...",
        show_default=False,
    ),
) -> None:
    """Train ReF-LDM (VQGAN -> LQ-only LDM -> ReF-LDM with CacheKV and the identity loss).

    Runs in this process on one device; for several GPUs or nodes use `accelerate launch -m refface.train.refldm.train` with the same flags. Rerunning resumes from the latest checkpoint; a finished stage does no work.
    """
    from refface.train.refldm.config import STAGES
    from refface.train.refldm.train import RefLDMRun, main

    if stage not in STAGES:
        raise typer.BadParameter(f"choose one of {', '.join(STAGES)}", param_hint="--stage")
    main(
        RefLDMRun(
            config=str(config),
            dataset=dataset,
            stage=stage,
            output=str(output),
            max_steps=max_steps,
            resume=resume,
            init=str(init) if init is not None else None,
            overrides=tuple(overrides or ()),
        )
    )


@exits_on_error()
def evaluate_cmd(
    restored: Path = typer.Option(..., "--restored", help="Folder of restored images."),
    gt: Path = typer.Option(..., "--gt", help="Folder of ground-truth images."),
    protocol: str = typer.Option(
        "refldm",
        "--protocol",
        help="refldm: ReF-LDM's scripts/eval.py (flat <stem>.png pairs, PIL resize to 512, pyiqa "
        "PSNR/SSIM/NIQE, MUSIQ, FID against --fid-stats), the protocol of the ReF-LDM/MGFR tables. "
        "refface: pairs by relative path at stored size, BasicSR-form metrics, FID against the GT set.",
    ),
    refs: Path | None = typer.Option(
        None, "--refs", help="ReF-LDM reference CSV; only its targets are scored."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Where metrics.csv / metrics.md / per_image.csv go (default: <restored>_eval).",
    ),
    name: str | None = typer.Option(None, "--name", help="Method name in the table (default: folder name)."),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="Folder holding the metric weights under their usual names (refldm: "
        "insightface_webface_r50.onnx, vgg16-397923af.pth, lpips_vgg_v0.1.pth, "
        "pt_inception-2015-12-05-6726825d.pth, ffhq_clean_trainval70k_512.npz, "
        "musiq_koniq_ckpt-e95806b9.pth; refface: w600k_r50.onnx, inception-2015-12-05.pt, "
        "niqe_pris_params.npz); default $REFFACE_WEIGHTS, else (refldm) pyiqa's download folder.",
    ),
    arcface: str | None = typer.Option(None, "--arcface", help="ArcFace file for IDS (overrides --weights)."),
    lpips_backbone: str | None = typer.Option(
        None, "--lpips-backbone", help="torchvision VGG16 .pth for LPIPS."
    ),
    lpips_head: str | None = typer.Option(None, "--lpips-head", help="lpips v0.1 vgg.pth head."),
    inception: str | None = typer.Option(
        None, "--inception", help="FID Inception: pytorch-fid .pth or TorchScript .pt."
    ),
    fid_stats: str | None = typer.Option(
        None,
        "--fid-stats",
        help="FID reference statistics .npz (mu, sigma): clean-fid's ffhq_clean_trainval70k_512.npz.",
    ),
    fid_ref: str | None = typer.Option(
        None,
        "--fid-ref",
        help="stats (the --fid-stats file; refldm default) or gt (the GT set's own features; refface default).",
    ),
    musiq: str | None = typer.Option(
        None, "--musiq", help="pyiqa's musiq_koniq_ckpt-e95806b9.pth (MUSIQ runs through pyiqa)."
    ),
    parsing: str | None = typer.Option(
        None,
        "--parsing",
        help="Face parsing for fLPIPS: a folder of <stem>.npy/.png CelebAMask-HQ label maps, or a "
        "19-class ONNX parser.",
    ),
    niqe_params: str | None = typer.Option(
        None, "--niqe-params", help="NIQE pristine model (.npz/.mat); refldm ships the published one."
    ),
) -> None:
    """Score restored faces: IDS, LPIPS, fLPIPS, NIQE, MUSIQ, FID, PSNR, SSIM (docs/evaluation.md).

    Learned metrics load their weights from local files only; a metric whose file is missing is shown as n/a with the reason, the others are still computed. Unreadable or unmatched images go to errors.csv.
    """
    from rich.markdown import Markdown

    from refface.console import console, print_summary
    from refface.evaluation.evaluate import evaluate_folders
    from refface.evaluation.tables import markdown_table
    from refface.evaluation.weights import PROTOCOLS, EvalWeights

    if protocol not in PROTOCOLS:
        console.print(f"[red]error:[/red] --protocol must be one of {', '.join(PROTOCOLS)}")
        raise typer.Exit(2)
    folder = weights or (Path(os.environ["REFFACE_WEIGHTS"]) if os.environ.get("REFFACE_WEIGHTS") else None)
    if folder is None and protocol == "refldm":
        from refface.evaluation.musiq import pyiqa_cache

        folder = pyiqa_cache()
    w = EvalWeights.from_dir(
        folder,
        protocol,
        arcface=arcface,
        lpips_backbone=lpips_backbone,
        lpips_head=lpips_head,
        inception=inception,
        niqe_params=niqe_params,
        fid_stats=fid_stats,
        musiq=musiq,
        parsing=parsing,
    )
    result = evaluate_folders(
        restored,
        gt,
        refs_csv=refs,
        weights=w,
        out=out or restored.parent / f"{restored.name}_eval",
        name=name,
        protocol=protocol,
        fid_reference=fid_ref,
    )
    console.print(Markdown(markdown_table([result])))
    print_summary(
        "evaluate",
        {
            "protocol": protocol,
            "images scored": len(result.per_image),
            "errors": len(result.errors),
            "unavailable metrics": ", ".join(sorted(result.unavailable)) or "none",
            "tables": result.outputs.get("metrics.md", ""),
        },
    )
