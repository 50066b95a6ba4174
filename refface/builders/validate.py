"""``refface validate``: check a reference dataset root (built here or downloaded) for every known defect."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from refface.console import track
from refface.manifests.errors import ImageError
from refface.manifests.io import read_image
from refface.manifests.layout import BUILD, IDENTITIES, SPLITS, references_filename, split_filename
from refface.manifests.references import read_references
from refface.manifests.root import PathEscapesRoot, safe_relative
from refface.manifests.splits import read_split_list

# Published FFHQ-Ref keeps the CSVs and split lists in these subfolders.
PUBLISHED_DIRS = {"references": "reference_mapping", "splits": "id_based_ffhq_split"}
MAX_LISTED = 20


@dataclass
class ValidationReport:
    """What was checked and every problem found (empty ``problems`` = valid)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, items: list[str]) -> None:
        """One problem line per kind, listing up to ``MAX_LISTED`` examples."""
        if not items:
            return
        shown = "; ".join(items[:MAX_LISTED])
        more = f" (and {len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
        self.problems.append(f"{kind}: {len(items)} - {shown}{more}")


def _find(root: Path, name: str, sub: str) -> Path | None:
    for candidate in (root / name, root / sub / name):
        if candidate.exists():
            return candidate
    return None


def label_agreement(refs: Mapping[str, pd.DataFrame], labels: pd.DataFrame) -> dict:
    """How well reference lists agree with known identity labels.

    Args:
        refs: ``{split: frame}`` with ``gt_image`` and parsed ``ref_image`` lists.
        labels: ``path, identity`` (empty identity = unknown) and optionally ``source``: labels from
            different sources were assigned independently, so one person may carry two labels.

    Returns:
        ``pairs_labeled`` (target and reference both labeled), ``precision`` (share of those pairs with the
        same label), ``pairs_same_source`` / ``precision_same_source`` (the same over pairs whose labels come
        from one source, where different labels do mean different people),
        ``targets_labeled_singleton_with_refs`` (targets whose label occurs once in ``labels`` yet got
        references; should be 0) and ``targets_with_refs``.
    """
    known = labels[labels["identity"].astype(str) != ""]
    label_of = dict(zip(known["path"], known["identity"], strict=True))
    if "source" in known.columns:
        source_of = dict(zip(known["path"], known["source"], strict=True))
    else:
        source_of = {p: str(p).split("/")[0] for p in known["path"]}
    counts = known["identity"].value_counts()
    same = total = same_src = total_src = singles = targets = 0
    for df in refs.values():
        for gt, ref_list in zip(df["gt_image"], df["ref_image"], strict=True):
            targets += 1
            lab = label_of.get(gt)
            if lab is not None and counts.get(lab, 0) == 1:
                singles += 1
            for r in ref_list:
                if lab is not None and r in label_of:
                    hit = int(label_of[r] == lab)
                    total += 1
                    same += hit
                    if source_of[r] == source_of[gt]:
                        total_src += 1
                        same_src += hit
    return {
        "targets_with_refs": targets,
        "pairs_labeled": total,
        "precision": same / total if total else float("nan"),
        "pairs_same_source": total_src,
        "precision_same_source": same_src / total_src if total_src else float("nan"),
        "targets_labeled_singleton_with_refs": singles,
    }


def validate_root(
    root: str | Path,
    image_root: str | Path | None = None,
    ref_root: str | Path | None = None,
    lq_root: str | Path | None = None,
    decode: bool = True,
) -> ValidationReport:
    """Check a dataset root: CSV columns/types, files exist and decode, identities, self and cross-split refs.

    Args:
        root: dataset root (ours, or a published FFHQ-Ref folder with ``reference_mapping/``).
        image_root: where ``gt_image`` paths live; default: ``image_root`` from build.json.
        ref_root: where references live; default: ``ref_root`` from build.json, else ``image_root``.
        lq_root: where ``lq_image`` paths live; LQ files are checked only when this is known.
        decode: decode every image (slower) instead of only checking that it exists.

    Returns:
        A :class:`ValidationReport`; ``report.ok`` is False when anything is wrong.
    """
    root = Path(root)
    report = ValidationReport()
    build = {}
    if (root / BUILD).exists():
        build = json.loads((root / BUILD).read_text())
    image_root = (
        Path(image_root) if image_root else (Path(build["image_root"]) if build.get("image_root") else None)
    )
    ref_root = (
        Path(ref_root) if ref_root else (Path(build["ref_root"]) if build.get("ref_root") else image_root)
    )
    lq_root = Path(lq_root) if lq_root else (Path(build["lq_root"]) if build.get("lq_root") else None)
    if not root.is_dir():
        report.problems.append(f"dataset root not found: {root}")
        return report

    refs: dict[str, pd.DataFrame] = {}
    for split in SPLITS:
        path = _find(root, references_filename(split), PUBLISHED_DIRS["references"])
        if path is None:
            continue
        bad_rows: list[str] = []
        try:
            df = read_references(path, bad_rows=bad_rows)
        except (ValueError, pd.errors.ParserError) as e:
            report.problems.append(str(e))
            continue
        # Rows that do not parse are reported together; the rest of the file is still checked.
        report.add(f"{path.name}: unreadable row", bad_rows)
        if split != "train" and "lq_image" not in df.columns:
            report.problems.append(f"{path.name}: missing column lq_image (needed for {split})")
        empty_gt = df.index[df["gt_image"].astype(str).str.strip() == ""].tolist()
        report.add(f"{path.name}: empty gt_image", [f"row {i + 2}" for i in empty_gt])
        report.add(
            f"{path.name}: empty reference list",
            [g for g, r in zip(df["gt_image"], df["ref_image"], strict=True) if not r],
        )
        dup = df["gt_image"][df["gt_image"].duplicated()].tolist()
        report.add(f"{path.name}: target listed twice", dup)
        report.add(
            f"{path.name}: target lists itself",
            [g for g, r in zip(df["gt_image"], df["ref_image"], strict=True) if g in r],
        )
        report.add(
            f"{path.name}: reference repeated in a list",
            [g for g, r in zip(df["gt_image"], df["ref_image"], strict=True) if len(set(r)) != len(r)],
        )
        refs[split] = df
        report.counts[f"{split}_targets"] = len(df)
    if not refs:
        report.problems.append(f"no *_references.csv in {root} or {root / PUBLISHED_DIRS['references']}")
        return report

    # Identities: every reference must carry its target's identity.
    ident_path = root / IDENTITIES
    if ident_path.exists():
        ident = pd.read_parquet(ident_path)
        label_of = dict(zip(ident["path"], ident["identity"], strict=True))
        wrong = []
        for df in refs.values():
            for gt, ref_list in zip(df["gt_image"], df["ref_image"], strict=True):
                lab = label_of.get(gt, -1)
                for r in ref_list:
                    if lab < 0 or label_of.get(r, -2) != lab:
                        wrong.append(f"{gt} -> {r}")
        report.add("reference of another identity", wrong)
    else:
        report.notes.append("no identities.parquet: identity agreement not checked")

    # Splits: lists are disjoint, targets sit in their own split, references never cross.
    split_of: dict[str, str] = {}
    lists_found = False
    for split in SPLITS:
        path = _find(root, split_filename(split), PUBLISHED_DIRS["splits"])
        if path is None:
            continue
        lists_found = True

        twice = []
        for p in read_split_list(path):
            if p in split_of and split_of[p] != split:
                twice.append(f"{p} ({split_of[p]} and {split})")
            split_of[p] = split
        report.add("image in two split lists", twice)
        report.counts[f"{split}_images"] = sum(1 for s in split_of.values() if s == split)
    if lists_found:
        same_pool = ref_root is None or image_root is None or ref_root.resolve() == image_root.resolve()
        misplaced, crossing = [], []
        for split, df in refs.items():
            for gt, ref_list in zip(df["gt_image"], df["ref_image"], strict=True):
                if split_of.get(gt) != split:
                    misplaced.append(f"{gt} (in {split_of.get(gt, 'no list')})")
                for r in ref_list:
                    s = split_of.get(r)
                    if (s is not None and s != split) or (s is None and same_pool):
                        crossing.append(f"{gt} ({split}) -> {r} ({s or 'no list'})")
        report.add("target not in its split list", misplaced)
        report.add("reference crosses splits", crossing)
    else:
        report.notes.append("no split lists: cross-split references not checked")

    # Files: every target, reference and (when its folder is known) LQ image exists and decodes.
    if image_root is None:
        report.notes.append("image root unknown (no build.json, no --images): files not checked")
    else:
        wanted: dict[Path, str] = {}
        escaping: list[str] = []

        def want(base: Path, rel: str, what: str) -> None:
            # A path that leaves its folder is reported and never opened.
            try:
                wanted[base / safe_relative(rel)] = what
            except PathEscapesRoot as e:
                escaping.append(f"{rel} ({what}): {e}")

        for split, df in refs.items():
            for gt in df["gt_image"]:
                want(image_root, gt, f"{split} target")
            for ref_list in df["ref_image"]:
                for r in ref_list:
                    want(ref_root if ref_root is not None else image_root, r, f"{split} reference")
            if lq_root is not None and "lq_image" in df.columns:
                for lq in df["lq_image"]:
                    want(lq_root, lq, f"{split} LQ")
        report.add("path leaves the image root", escaping)
        missing, broken = _check_files(wanted, decode)
        report.add("missing file", missing)
        report.add("file does not decode", broken)
        report.counts["files_checked"] = len(wanted)
    return report


def _check_files(wanted: dict[Path, str], decode: bool) -> tuple[list[str], list[str]]:
    missing, broken = [], []
    for path in track(sorted(wanted), "checking files"):
        if not path.is_file():
            missing.append(f"{path} ({wanted[path]})")
        elif decode:
            try:
                read_image(path)
            except ImageError as e:
                broken.append(f"{path}: {e}")
    return missing, broken
