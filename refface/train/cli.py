"""``refface train ...`` and ``refface restore``: the training and inference commands of both models."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import typer

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


def register(app: typer.Typer) -> None:
    from refface.train.mgfr.cli import train_mgfr

    train_app.command("mgfr")(train_mgfr)

    from refface.train.refldm.cli import train_refldm

    train_app.command("refldm")(train_refldm)

    app.add_typer(train_app, name="train")
    app.command("restore")(restore)


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
        "Every face is restored with these references.",
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
    embedder: str | None = typer.Option(None, help="MGFR: identity embedder for references (arcface, dlib)."),
    embedder_model: Path | None = typer.Option(None, help="MGFR: embedder weights (ArcFace ONNX path)."),
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

        try:
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
            )
        except (FileNotFoundError, ValueError) as exc:
            raise typer.BadParameter(str(exc)) from exc
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
    try:
        counts = fn(input_dir, output_dir, checkpoint=checkpoint, **kwargs)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    print_summary(f"refface restore --model {model}", {"output": str(output_dir), **(counts or {})})
