"""Hand corrections of identity clusters: ``corrections.csv`` (``path, action, value``) read and applied.

Actions (one row each; ``path`` names an image as in ``identities.parquet``):

- ``drop``: the image leaves the dataset: in no split list, never a target or a reference (it stays in
  ``identities.parquet`` as a singleton, -1, so the table still covers every embedding row).
- ``singleton``: the image leaves its identity and stays alone (kept in the split lists, no references).
- ``move``: the image joins identity ``value``.
- ``merge``: the whole identity of ``path`` joins identity ``value``.

``value`` names an identity as the clustering numbered it (an integer from ``identities.parquet``), the
path of an image whose clustered identity is meant, or ``new:KEY``: every row with the same ``KEY`` lands
in one new identity. Rows are resolved against the clustered table, so the same file applied to the
same clustering always gives the same identities: merges first (in file order, chained merges follow
through), then per-image rows (the last row of an image wins). Rows that no longer match anything
(image not in the root, identity gone, action unknown) are reported with the reason and skipped.
Identities nobody touched keep their numbers; new identities are numbered after the largest one.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ACTIONS = ("drop", "singleton", "move", "merge")
COLUMNS = ("path", "action", "value")
NEW_PREFIX = "new:"


@dataclass(frozen=True)
class Correction:
    row: int  # 1-based data row in the file (header excluded)
    path: str
    action: str
    value: str


@dataclass
class CorrectionReport:
    """What applying a corrections file did: rows applied, rows skipped with their reason."""

    rows: int = 0
    applied: list[dict] = field(default_factory=list)
    unmatched: list[dict] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    changed_identities: list[int] = field(default_factory=list)
    new_identities: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "applied": len(self.applied),
            "unmatched": self.unmatched,
            "dropped": len(self.dropped),
            "changed_identities": self.changed_identities,
            "new_identities": self.new_identities,
        }


def parse_corrections(text: str) -> list[Correction]:
    """Rows of a ``path,action,value`` CSV (header required; blank lines and ``#`` comments skipped)."""
    reader = csv.reader(io.StringIO(text))
    header = None
    out: list[Correction] = []
    n = 0
    for raw in reader:
        if not raw or not "".join(raw).strip() or raw[0].lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in raw]
        if header is None:
            header = [c.lower() for c in cells]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise ValueError(f"corrections CSV needs columns {', '.join(COLUMNS)}; missing {missing}")
            continue
        n += 1
        row = dict(zip(header, cells + [""] * (len(header) - len(cells)), strict=False))
        out.append(Correction(n, row["path"], row["action"].lower(), row["value"]))
    if header is None:
        raise ValueError("corrections CSV is empty (expected a header: path,action,value)")
    return out


def read_corrections(path: str | Path) -> list[Correction]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corrections file not found: {path}")
    return parse_corrections(path.read_text(encoding="utf-8"))


def format_corrections(rows: list[tuple[str, str, str]]) -> str:
    """CSV text of ``(path, action, value)`` rows with the header (what the review page exports)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    return buf.getvalue()


def apply_corrections(
    table: pd.DataFrame, corrections: list[Correction]
) -> tuple[pd.DataFrame, CorrectionReport]:
    """Apply corrections to an identities table (``path, identity, cluster_size``; -1 = singleton).

    Returns the corrected table (same rows; dropped images -1, ``cluster_size`` recounted, identities
    left with one image become -1) and the report.
    """
    table = table.drop_duplicates("path").reset_index(drop=True)
    paths = table["path"].astype(str).tolist()
    clustered = dict(zip(paths, table["identity"].astype(int), strict=True))
    existing = {i for i in clustered.values() if i >= 0}
    report = CorrectionReport(rows=len(corrections))

    def skip(c: Correction, reason: str) -> None:
        report.unmatched.append(
            {"row": c.row, "path": c.path, "action": c.action, "value": c.value, "reason": reason}
        )

    new_keys: dict[str, int] = {}
    next_id = [max(existing, default=-1) + 1]

    def resolve(c: Correction) -> int | None:
        value = c.value
        if value.startswith(NEW_PREFIX) and len(value) > len(NEW_PREFIX):
            key = value[len(NEW_PREFIX) :]
            if key not in new_keys:
                new_keys[key] = next_id[0]
                next_id[0] += 1
            return new_keys[key]
        try:
            ident = int(value)
        except ValueError:
            if value in clustered:
                if clustered[value] < 0:
                    skip(c, f"image {value!r} named as the identity is a singleton (use new:KEY)")
                    return None
                return clustered[value]
            skip(c, f"value {value!r} is neither an identity number, an image of the root nor new:KEY")
            return None
        if ident not in existing:
            skip(c, f"identity {ident} does not exist in this clustering")
            return None
        return ident

    # Merges: identity -> identity it joins (followed transitively, cycles broken by file order).
    merged_into: dict[int, int] = {}
    per_image: dict[str, tuple[Correction, int | None]] = {}
    for c in corrections:
        if c.action not in ACTIONS:
            skip(c, f"unknown action {c.action!r} (expected one of {', '.join(ACTIONS)})")
            continue
        if c.path not in clustered:
            skip(c, "image not in this dataset root (renamed, removed or never embedded)")
            continue
        if c.action in ("drop", "singleton"):
            per_image[c.path] = (c, None)
            continue
        target = resolve(c)
        if target is None:
            continue
        if c.action == "merge" and clustered[c.path] >= 0:
            source = clustered[c.path]
            root = _follow(merged_into, target)
            if root == source:
                skip(c, f"identity {source} already is (or joins) identity {target}")
                continue
            merged_into[source] = target
            report.applied.append({"row": c.row, "path": c.path, "action": c.action, "value": c.value})
            continue
        # move (or a merge of a lone image, which is a move).
        per_image[c.path] = (c, target)

    final: dict[str, int] = {}
    for p in paths:
        ident = clustered[p]
        final[p] = _follow(merged_into, ident) if ident >= 0 else ident
    for p, (c, target) in per_image.items():
        if c.action == "drop":
            report.dropped.append(p)
        elif c.action == "singleton":
            final[p] = -1
        else:
            final[p] = _follow(merged_into, target)  # type: ignore[arg-type]
        report.applied.append({"row": c.row, "path": c.path, "action": c.action, "value": c.value})
    superseded = {id(c) for c, _ in per_image.values()}
    for c in corrections:
        if c.action in ACTIONS and c.action != "merge" and c.path in per_image and id(c) not in superseded:
            if not any(u["row"] == c.row for u in report.unmatched):
                skip(c, "superseded by a later row for the same image")
    dropped = set(report.dropped)
    out = pd.DataFrame({"path": paths})
    out["identity"] = [-1 if p in dropped else final[p] for p in paths]
    sizes = out.loc[out["identity"] >= 0, "identity"].value_counts()
    out["identity"] = [i if i >= 0 and sizes.get(i, 0) >= 2 else -1 for i in out["identity"]]
    sizes = out.loc[out["identity"] >= 0, "identity"].value_counts()
    out["cluster_size"] = [int(sizes.get(i, 0)) if i >= 0 else 1 for i in out["identity"]]
    out = out.astype({"identity": "int64", "cluster_size": "int64"})
    after = dict(zip(out["path"], out["identity"].astype(int), strict=True))
    changed: set[int] = set()
    for p in paths:
        if after[p] != clustered[p]:
            changed.update(i for i in (clustered[p], after[p]) if i >= 0)
    report.changed_identities = sorted(changed)
    report.new_identities = sorted(set(new_keys.values()) & set(after.values()))
    report.applied.sort(key=lambda r: r["row"])
    report.unmatched.sort(key=lambda r: r["row"])
    return out, report


def _follow(merged_into: dict[int, int], ident: int) -> int:
    seen = set()
    while ident in merged_into and ident not in seen:
        seen.add(ident)
        ident = merged_into[ident]
    return ident


def pool_exclusions(
    corrections: list[Correction], targets: list[str], pool: list[str]
) -> tuple[set[str], set[str], CorrectionReport]:
    """Corrections for a build without clusters (targets searched in a pool, CelebA-Test-Ref).

    ``drop`` removes the image as a target and from the pool; ``singleton`` keeps it out of the pool
    (never a reference); ``move`` and ``merge`` have no cluster to act on and are reported.
    Returns (targets to drop, pool images to exclude, report).
    """
    report = CorrectionReport(rows=len(corrections))
    known_t, known_p = set(targets), set(pool)
    drop_t: set[str] = set()
    drop_p: set[str] = set()
    for c in corrections:
        reason = None
        if c.action not in ACTIONS:
            reason = f"unknown action {c.action!r} (expected one of {', '.join(ACTIONS)})"
        elif c.action in ("move", "merge"):
            reason = f"{c.action} needs identity clusters; this build searches a pool per target"
        elif c.path not in known_t and c.path not in known_p:
            reason = "image not among the targets or the pool"
        if reason:
            report.unmatched.append(
                {"row": c.row, "path": c.path, "action": c.action, "value": c.value, "reason": reason}
            )
            continue
        if c.action == "drop" and c.path in known_t:
            drop_t.add(c.path)
            report.dropped.append(c.path)
        if c.path in known_p:
            drop_p.add(c.path)
        report.applied.append({"row": c.row, "path": c.path, "action": c.action, "value": c.value})
    return drop_t, drop_p, report


def corrections_from_labels(table: pd.DataFrame, labels: dict[str, str]) -> list[tuple[str, str, str]]:
    """Corrections that make every identity hold one known label (``path, action, value`` rows).

    In an identity holding several labels, the largest label group stays (ties: the first label in
    sorted order); every other group moves to the identity where its label is the largest group, else
    to ``new:<label>``. Unlabeled images are not touched.
    """
    table = table.drop_duplicates("path")
    groups: dict[int, dict[str, list[str]]] = {}
    for path, ident in zip(table["path"].astype(str), table["identity"].astype(int), strict=True):
        label = labels.get(path)
        if ident >= 0 and label:
            groups.setdefault(ident, {}).setdefault(label, []).append(path)
    head_of: dict[int, str] = {}
    home: dict[str, int] = {}
    for ident in sorted(groups):
        by_label = groups[ident]
        head = sorted(by_label, key=lambda k: (-len(by_label[k]), k))[0]
        head_of[ident] = head
        size = len(by_label[head])
        if head not in home or size > len(groups[home[head]][head]):
            home[head] = ident
    rows = []
    for ident in sorted(groups):
        for label, members in sorted(groups[ident].items()):
            if label == head_of[ident]:
                continue
            value = str(home[label]) if label in home else NEW_PREFIX + label
            rows += [(p, "move", value) for p in sorted(members)]
    return rows
