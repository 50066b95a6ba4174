"""Stage ``corrections``: apply a reviewed ``corrections.csv`` to a built root's identities.

Runs after the stage that wrote ``identities.parquet`` (clustering, or Reface-HQ curation) and before
splits and references. The clustered table is kept as ``identities_clustered.parquet`` and
``identities.parquet`` becomes the corrected one, so every later reader (splits, references, card,
audit, review page) sees the corrected identities. A build without ``--corrections`` restores the
clustered table. ``corrections.json`` records the rows applied and those that no longer match.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from refface.manifests.atomic import sha256_file, write_bytes, write_json, write_parquet
from refface.manifests.layout import IDENTITIES
from refface.stages import manifest_path, read_manifest, run_stage

from .corrections import apply_corrections, read_corrections

STAGE = "corrections"
CLUSTERED_FILE = "identities_clustered.parquet"
MARKER_FILE = "identities_clustered.json"
REPORT_FILE = "corrections.json"


def _producer_fingerprint(root: Path, producer: str) -> str | None:
    manifest = read_manifest(root, producer)
    return manifest.get("fingerprint") if manifest else None


def _clustered_is_current(root: Path, producer_fp: str | None) -> bool:
    """True when ``identities_clustered.parquet`` holds the producer's latest output."""
    marker = root / MARKER_FILE
    if not marker.exists() or not (root / CLUSTERED_FILE).exists():
        return False
    return json.loads(marker.read_text()).get("fingerprint") == producer_fp


def corrections_stage(root: str | Path, corrections: str | Path | None, producer: str) -> dict | None:
    """Apply ``corrections`` (or undo earlier ones when None); returns the report or None.

    Args:
        root: dataset root holding ``identities.parquet``.
        corrections: the reviewed CSV (``path, action, value``), or None for the clustered identities.
        producer: name of the stage that wrote ``identities.parquet`` (its manifest tells whether the
            kept clustered table is still its latest output).
    """
    root = Path(root)
    producer_fp = _producer_fingerprint(root, producer)
    current = _clustered_is_current(root, producer_fp)
    if corrections is None:
        if current:
            write_bytes(root / IDENTITIES, (root / CLUSTERED_FILE).read_bytes())
        for path in (
            root / REPORT_FILE,
            manifest_path(root, STAGE),
            root / MARKER_FILE,
            root / CLUSTERED_FILE,
        ):
            path.unlink(missing_ok=True)
        return None
    corrections = Path(corrections)
    rows = read_corrections(corrections)  # fails early on a missing or malformed file
    if not current:
        # identities.parquet is the producer's own output: keep it before correcting it.
        write_bytes(root / CLUSTERED_FILE, (root / IDENTITIES).read_bytes())
        write_json(root / MARKER_FILE, {"producer": producer, "fingerprint": producer_fp})

    def work() -> dict:
        table = pd.read_parquet(root / CLUSTERED_FILE)
        corrected, report = apply_corrections(table, rows)
        write_parquet(root / IDENTITIES, corrected)
        info = {
            "file": str(corrections.resolve()),
            "sha256": sha256_file(corrections),
            **report.to_dict(),
            "dropped_paths": sorted(report.dropped),
            "identities_before": int(table.loc[table["identity"] >= 0, "identity"].nunique()),
            "identities_after": int(corrected.loc[corrected["identity"] >= 0, "identity"].nunique()),
        }
        write_json(root / REPORT_FILE, info)
        return {"outputs": [IDENTITIES, REPORT_FILE]}

    inputs = {"clustered": sha256_file(root / CLUSTERED_FILE), "corrections": sha256_file(corrections)}
    run_stage(root, STAGE, {"actions": "drop,singleton,move,merge"}, inputs, work)
    return json.loads((root / REPORT_FILE).read_text())


def read_report(root: str | Path) -> dict | None:
    """``corrections.json`` of a root, or None when its identities are the clustering's own."""
    path = Path(root) / REPORT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def dropped_paths(root: str | Path) -> set[str]:
    report = read_report(root)
    return set(report.get("dropped_paths", [])) if report else set()


def card_lines(report: dict | None) -> list[str]:
    """The card's ``Corrections`` section (empty without corrections)."""
    if not report:
        return []
    text = (
        f"Reviewed corrections `{Path(report['file']).name}` (sha256 `{report['sha256'][:12]}`): "
        f"{report['applied']} of {report['rows']} rows applied, {len(report['unmatched'])} no longer match; "
        f"{report['dropped']} images dropped"
    )
    if "identities_before" in report:
        text += (
            f"; identities {report['identities_before']} -> {report['identities_after']}; "
            f"{len(report['changed_identities'])} identities changed, "
            f"{len(report['new_identities'])} of them new"
        )
    lines = ["## Corrections", "", text + ".", ""]
    if report["unmatched"]:
        lines += ["| row | path | action | value | why it was skipped |", "|---|---|---|---|---|"]
        lines += [
            f"| {u['row']} | {u['path']} | {u['action']} | {u['value']} | {u['reason']} |"
            for u in report["unmatched"]
        ]
        lines.append("")
    return lines
