"""Dataset card: card.md with counts, the rules used and PNG plots of a built dataset root."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from refface.builders.validate import label_agreement
from refface.manifests.atomic import atomic_path, write_text
from refface.manifests.errors import ErrorsTable
from refface.manifests.layout import SPLITS, SPLITS_TABLE, references_filename
from refface.manifests.references import read_references
from refface.manifests.root import DatasetRoot
from refface.mining.references import distance_matrix
from refface.review.stage import card_lines, read_report

PLOTS_DIR = "plots"


def _save(fig, target: Path) -> None:
    # No "Software" metadata: the PNG bytes then depend only on the data and the renderer.
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def reference_distances(root: Path, refs: dict[str, pd.DataFrame]) -> dict[str, np.ndarray]:
    """Target-reference cosine distances per split."""
    emb, paths, vectors = DatasetRoot(root).embeddings_by_path()
    row = {p: i for i, p in enumerate(paths)}
    out = {}
    for split, df in refs.items():
        values = []
        for gt, ref_list in zip(df["gt_image"], df["ref_image"], strict=True):
            rows = [row[r] for r in ref_list if r in row]
            if gt in row and rows:
                values.extend(distance_matrix(vectors[[row[gt]]], vectors[rows], "cosine")[0].tolist())
        out[split] = np.asarray(values)
    return out


def draw_plots(root: Path, table: pd.DataFrame, assigned: pd.DataFrame, refs, distances) -> list[str]:
    """The four card plots; returns their paths relative to the root."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outputs = []

    def finish(fig, name: str) -> None:
        fig.tight_layout()
        _save(fig, root / PLOTS_DIR / name)
        plt.close(fig)
        outputs.append(f"{PLOTS_DIR}/{name}")

    sizes = table.loc[table["identity"] >= 0].groupby("identity").size()
    fig, ax = plt.subplots(figsize=(6, 4))
    if len(sizes):
        ax.hist(sizes, bins=(np.arange(2, sizes.max() + 2) - 0.5).tolist(), color="#4c72b0")
    ax.set(title="Images per identity", xlabel="cluster size", ylabel="identities")
    finish(fig, "cluster_sizes.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for split in SPLITS:
        counts = refs[split]["ref_image"].map(len)
        if len(counts):
            ax.hist(counts, bins=(np.arange(1, counts.max() + 2) - 0.5).tolist(), alpha=0.6, label=split)
    ax.set(title="References per target", xlabel="references", ylabel="targets")
    ax.legend()
    finish(fig, "refs_per_target.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for split in SPLITS:
        if len(distances[split]):
            ax.hist(distances[split], bins=40, alpha=0.6, label=split, density=True)
    ax.set(title="Target-reference distance", xlabel="distance", ylabel="density")
    ax.legend()
    finish(fig, "ref_distances.png")

    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    images = [int((assigned["split"] == s).sum()) for s in SPLITS]
    idents = [
        int(assigned.loc[(assigned["split"] == s) & (assigned["identity"] >= 0), "identity"].nunique())
        for s in SPLITS
    ]
    axes[0].bar(SPLITS, images, color="#4c72b0")
    axes[0].set(title="Images per split")
    axes[1].bar(SPLITS, idents, color="#dd8452")
    axes[1].set(title="Identities per split")
    finish(fig, "split_sizes.png")
    return outputs


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_card(root: str | Path, config: Any, title: str) -> list[str]:
    """Write ``card.md`` (and plots when ``config.plots``) for a built root; returns relative outputs."""
    root = Path(root)
    assigned = pd.read_parquet(root / SPLITS_TABLE)
    table = assigned
    refs = {s: read_references(root / references_filename(s)) for s in SPLITS}
    distances = reference_distances(root, refs)
    outputs = draw_plots(root, table, assigned, refs, distances) if config.plots else []

    sizes = table.loc[table["identity"] >= 0].groupby("identity").size()
    lines = [f"# {title}", ""]
    lines += [
        "## Counts",
        "",
        _md_table(
            ["what", "value"],
            [
                ["input images", len(table)],
                ["images with an embedding", int(table["embedded"].sum())],
                ["identities (>= 2 images)", len(sizes)],
                ["images in identities", int(sizes.sum())],
                ["singletons / no face", int((table["identity"] < 0).sum())],
                ["largest identity", int(sizes.max()) if len(sizes) else 0],
            ],
        ),
        "",
        "## Splits",
        "",
    ]
    rows = []
    for s in SPLITS:
        part = assigned[assigned["split"] == s]
        n_refs = refs[s]["ref_image"].map(len)
        d = distances[s]
        rows.append(
            [
                s,
                len(part),
                part.loc[part["identity"] >= 0, "identity"].nunique(),
                len(refs[s]),
                f"{n_refs.mean():.2f}" if len(n_refs) else "-",
                f"{np.median(d):.3f}" if len(d) else "-",
            ]
        )
    lines += [
        _md_table(["split", "images", "identities", "targets", "refs/target", "median distance"], rows),
        "",
    ]
    if config.labels:
        labels = pd.read_csv(config.labels, dtype=str, keep_default_na=False)
        agree = label_agreement(refs, labels)
        lines += [
            "## Agreement with known labels",
            "",
            _md_table(
                ["what", "value"], [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in agree.items()]
            ),
            "",
        ]

    lines += card_lines(read_report(root))
    errors = ErrorsTable.read(root).counts_by_stage()
    lines += ["## Errors", ""]
    lines += [
        _md_table(["stage", "images"], [[k, v] for k, v in sorted(errors.items())]) if errors else "none",
        "",
    ]
    rules = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("workers", "chunk_size", "labels", "plots", "corrections")
    }
    lines += ["## Rules", "", _md_table(["field", "value"], [[k, v] for k, v in rules.items()]), ""]
    if outputs:
        lines += ["## Plots", ""] + [f"![{Path(o).stem}]({o})" for o in outputs] + [""]
    write_text(root / "card.md", "\n".join(lines))
    return ["card.md", *outputs]
