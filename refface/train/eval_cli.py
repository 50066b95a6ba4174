"""``refface evaluate``: restoration metrics of a restored folder against its GT, in ReF-LDM Table 7 layout."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        restored: Path = typer.Option(..., "--restored", help="Folder of restored images."),
        gt: Path = typer.Option(
            ..., "--gt", help="Folder of ground-truth images, matched by file name (any extension)."
        ),
        refs: Path | None = typer.Option(
            None, "--refs", help="ReF-LDM reference CSV; only its gt_image targets are scored."
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="Where metrics.csv / metrics.md / per_image.csv go (default: <restored>_eval).",
        ),
        name: str | None = typer.Option(
            None, "--name", help="Method name in the table (default: folder name)."
        ),
        weights: Path | None = typer.Option(
            None,
            "--weights",
            help="Folder holding the metric weights under their usual names (w600k_r50.onnx, vgg16-397923af.pth, "
            "lpips_vgg_v0.1.pth, inception-2015-12-05.pt, niqe_pris_params.npz); default $REFFACE_WEIGHTS.",
        ),
        arcface: str | None = typer.Option(
            None, "--arcface", help="ArcFace file for IDS (overrides --weights)."
        ),
        lpips_backbone: str | None = typer.Option(
            None, "--lpips-backbone", help="torchvision VGG16 .pth for LPIPS."
        ),
        lpips_head: str | None = typer.Option(None, "--lpips-head", help="lpips v0.1 vgg.pth head."),
        inception: str | None = typer.Option(None, "--inception", help="TorchScript FID Inception file."),
        niqe_params: str | None = typer.Option(
            None, "--niqe-params", help="NIQE pristine model (.npz/.mat)."
        ),
    ) -> None:
        """Score restored faces: IDS (ArcFace cosine to GT), LPIPS, fLPIPS (face region), NIQE, FID, PSNR, SSIM.

        Learned metrics load their weights from local files only; a metric whose file is missing is shown as n/a with the reason, the others are still computed. Unreadable or unmatched images go to errors.csv.
        """
        from rich.markdown import Markdown

        from refface.console import console, print_summary
        from refface.train.evaluate import EvalWeights, evaluate_folders, markdown_table

        folder = weights or (
            Path(os.environ["REFFACE_WEIGHTS"]) if os.environ.get("REFFACE_WEIGHTS") else None
        )
        w = EvalWeights.from_dir(
            folder,
            arcface=arcface,
            lpips_backbone=lpips_backbone,
            lpips_head=lpips_head,
            inception=inception,
            niqe_params=niqe_params,
        )
        try:
            result = evaluate_folders(
                restored,
                gt,
                refs_csv=refs,
                weights=w,
                out=out or restored.parent / f"{restored.name}_eval",
                name=name,
            )
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from e
        console.print(Markdown(markdown_table([result])))
        print_summary(
            "evaluate",
            {
                "images scored": len(result.per_image),
                "errors": len(result.errors),
                "unavailable metrics": ", ".join(sorted(result.unavailable)) or "none",
                "tables": result.outputs.get("metrics.md", ""),
            },
        )
