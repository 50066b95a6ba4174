"""``refface evaluate``: restoration metrics of a restored folder against its GT, in ReF-LDM Table 7 layout."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
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
        name: str | None = typer.Option(
            None, "--name", help="Method name in the table (default: folder name)."
        ),
        weights: Path | None = typer.Option(
            None,
            "--weights",
            help="Folder holding the metric weights under their usual names (refldm: "
            "insightface_webface_r50.onnx, vgg16-397923af.pth, lpips_vgg_v0.1.pth, "
            "pt_inception-2015-12-05-6726825d.pth, ffhq_clean_trainval70k_512.npz, "
            "musiq_koniq_ckpt-e95806b9.pth; refface: w600k_r50.onnx, inception-2015-12-05.pt, "
            "niqe_pris_params.npz); default $REFFACE_WEIGHTS, else (refldm) pyiqa's download folder.",
        ),
        arcface: str | None = typer.Option(
            None, "--arcface", help="ArcFace file for IDS (overrides --weights)."
        ),
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
        from refface.train.evaluate import PROTOCOLS, EvalWeights, evaluate_folders, markdown_table

        if protocol not in PROTOCOLS:
            console.print(f"[red]error:[/red] --protocol must be one of {', '.join(PROTOCOLS)}")
            raise typer.Exit(2)
        folder = weights or (
            Path(os.environ["REFFACE_WEIGHTS"]) if os.environ.get("REFFACE_WEIGHTS") else None
        )
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
        try:
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
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from e
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
