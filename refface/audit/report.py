"""The leakage audit's report.html: one self-contained page (inline PNG histograms and contact sheets)."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refface.audit.config import LEAK_KINDS, AuditResult, AuditSet, distance_to_dot
from refface.manifests.atomic import write_text
from refface.manifests.errors import ImageError
from refface.manifests.io import read_image

log = logging.getLogger(__name__)

THUMB = 128
PAIRS_PER_ROW = 3
KIND_COLOURS = {
    "exact": (200, 30, 30),
    "near_duplicate": (220, 120, 0),
    "same_identity": (40, 90, 200),
}

# Runs after every image decoded (or failed): the page marks itself so a headless browser
# (and a reader) can tell the report rendered completely.
ERROR_TRAP = """
<script>
window.__reportErrors = [];
window.addEventListener("error", function (e) {
  window.__reportErrors.push(String(e.message || (e.target && e.target.src) || "error").slice(0, 200));
}, true);
</script>
"""

RENDER_CHECK = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  var mark = document.getElementById("render-check");
  mark.setAttribute("data-images-total", String(imgs.length));
  mark.setAttribute("data-images-ok", String(ok));
  mark.setAttribute("data-tables", String(document.querySelectorAll("table").length));
  mark.setAttribute("data-errors", String(window.__reportErrors.length));
  mark.setAttribute("data-error-list", window.__reportErrors.join(" | "));
  mark.textContent = "rendered: " + ok + "/" + imgs.length + " images decoded";
  mark.className = ok === imgs.length && window.__reportErrors.length === 0 ? "ok" : "bad";
});
</script>
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; }
.pass { color: #0a7a2a; font-weight: bold; }
.fail { color: #b00020; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; }
#render-check { color: #888; font-size: 12px; }
code { background: #f6f6f6; padding: 1px 4px; }
"""


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def histogram_png(
    same: dict[str, np.ndarray],
    cross: np.ndarray,
    cross_label: str,
    identity_sim: float,
    near_sim: float,
    title: str,
    cluster_sim: float | None = None,
) -> bytes:
    """Histogram of nearest-neighbour similarities, same-set vs cross-set, with the bars marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [v for v in [*same.values(), cross] if len(v)]
    lo = min([float(np.min(v)) for v in values] + [identity_sim]) - 0.02
    hi = max([float(np.max(v)) for v in values] + [1.0])
    bins = np.linspace(lo, hi, 60).tolist()
    fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=100)
    for name, v in same.items():
        if len(v):
            ax.hist(
                v,
                bins=bins,
                histtype="step",
                linewidth=1.5,
                density=True,
                label=f"same set: {name} ({len(v)})",
            )
    if len(cross):
        ax.hist(cross, bins=bins, alpha=0.45, density=True, label=f"cross set: {cross_label} ({len(cross)})")
    ax.axvline(identity_sim, color="#b00020", linestyle="--", label=f"identity bar ({identity_sim:.3f})")
    ax.axvline(near_sim, color="#e07000", linestyle=":", label=f"near-duplicate bar ({near_sim:.3f})")
    if cluster_sim is not None:
        ax.axvline(
            cluster_sim, color="#555555", linestyle="-.", label=f"identity clustering cut ({cluster_sim:.3f})"
        )
    ax.set_xlabel("similarity to the nearest face (inner product of unit embeddings)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _thumb(path: str | None) -> Any:
    from PIL import Image

    canvas = Image.new("RGB", (THUMB, THUMB), (235, 235, 235))
    if not path:
        return canvas
    try:
        img = Image.fromarray(read_image(path))
    except ImageError as e:
        log.debug("thumbnail of %s: %s", path, e)
        return canvas
    img.thumbnail((THUMB, THUMB))
    canvas.paste(img, ((THUMB - img.width) // 2, (THUMB - img.height) // 2))
    return canvas


def contact_sheet_png(rows: Sequence[dict]) -> bytes:
    """Leaked pairs side by side (left set | right set), a caption under each pair."""
    from PIL import Image, ImageDraw

    caption_h = 30
    gap = 14
    cell_w = 2 * THUMB + 4
    cell_h = THUMB + caption_h
    n_cols = min(PAIRS_PER_ROW, max(1, len(rows)))
    n_rows = (len(rows) + n_cols - 1) // n_cols
    sheet = Image.new("RGB", (n_cols * (cell_w + gap) + gap, n_rows * (cell_h + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(rows):
        x = gap + (n % n_cols) * (cell_w + gap)
        y = gap + (n // n_cols) * (cell_h + gap)
        sheet.paste(_thumb(row.get("path_a")), (x, y))
        sheet.paste(_thumb(row.get("path_b")), (x + THUMB + 4, y))
        colour = KIND_COLOURS.get(row["kind"], (60, 60, 60))
        draw.rectangle([x - 2, y - 2, x + cell_w + 1, y + THUMB + 1], outline=colour, width=2)
        sim = row.get("similarity")
        sim_text = "no face" if sim is None or not np.isfinite(sim) else f"sim {sim:.3f}"
        extra = f"  phash {row['phash_distance']}" if row.get("phash_distance", -1) >= 0 else ""
        mirror = " (mirror)" if row.get("mirrored") else ""
        draw.text((x, y + THUMB + 3), f"{row['kind']}  {sim_text}{extra}{mirror}", fill=colour)
        label = f"{_short(row['image_a'])} | {_short(row['image_b'])}"
        draw.text((x, y + THUMB + 16), label, fill=(90, 90, 90))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _short(key: str, width: int = 20) -> str:
    key = str(key)
    return key if len(key) <= width else "…" + key[-(width - 1) :]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str | None = None) -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"l" if i == 0 else ""}">{_fmt(v)}</td>' for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(result: AuditResult, sets: Sequence[AuditSet]) -> str:
    """The report page for an audit result (see :func:`refface.audit.run.run_audit`)."""
    summary = result.summary
    th = result.thresholds

    identity_sim = distance_to_dot(th.identity, th.metric)
    near_sim = distance_to_dot(th.near_duplicate, th.metric)
    verdict = (
        '<span class="pass">PASSED</span>'
        if summary["passed"]
        else f'<span class="fail">FAILED</span> (leak rate above {summary["thresholds"]["max_leak_rate"]:g}'
        f" or cross-split references)"
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>refface leakage audit</title>",
        f"<style>{STYLE}</style>{ERROR_TRAP}</head><body>",
        f"<h1>Leakage audit</h1><p>Verdict: {verdict}. Worst leak rate: {summary['worst_leak_rate']:.4g}.</p>",
    ]
    model = summary["model"]
    parts.append("<h2>Model and thresholds</h2>")
    parts.append(
        _table(
            ["what", "value"],
            [
                ["embedder", model.get("model")],
                ["weights fingerprint", str(model.get("fingerprint"))[:16]],
                ["metric", th.metric],
                [
                    "identity rule",
                    f"{th.cluster_method} clustering of both sets together (the builder's rule), "
                    f"cosine cut {th.cluster_threshold:.4g}"
                    if th.rule == "cluster"
                    else "cross pairs closer than the identity bar",
                ],
                [f"identity bar (distance < {th.identity:.4g})", f"similarity > {identity_sim:.4f}"],
                [f"near-duplicate bar (distance < {th.near_duplicate:.4g})", f"similarity > {near_sim:.4f}"],
                ["perceptual hash bar", f"≤ {th.phash_distance} of 64 bits (image or mirror)"],
                ["exact duplicates by", summary["exact_duplicates_by"]],
            ],
            "model-table",
        )
    )
    parts.append("<h2>Sets</h2>")
    parts.append(
        _table(
            ["set", "kind", "images", "images with a face", "errors", "source"],
            [
                [name, s["kind"], s["images"], s["images_with_face"], s["errors"], s["source"]]
                for name, s in summary["sets"].items()
            ],
            "sets-table",
        )
    )
    parts.append("<h2>Summary</h2>")
    rows = []
    for key, p in summary["pairs"].items():
        a, b = p["sets"]
        rows.append(
            [
                key,
                p["leaked_images"][a],
                p["leaked_images"][b],
                p["leak_rate"],
                p["leaked_identities"],
                *[p["pairs_by_kind"][k] for k in LEAK_KINDS],
                "pass" if p["leak_rate"] <= summary["thresholds"]["max_leak_rate"] else "FAIL",
            ]
        )
    parts.append(
        _table(
            [
                "pair (a~b)",
                "leaked images in a",
                "leaked images in b",
                "leak rate",
                "leaked identities",
                "exact pairs",
                "near-duplicate pairs",
                "same-identity pairs",
                "gate",
            ],
            rows,
            "summary-table",
        )
    )
    refs = summary["references"]
    parts.append("<h2>Reference lists</h2>")
    ref_rows = []
    if any(refs["checked"].values()):
        for files in refs["checked"].values():
            for csv, info in files.items():
                ref_rows.append(
                    [csv, info.get("rows", "-"), info.get("cross_split_references", info.get("error", ""))]
                )
        parts.append(
            _table(["reference list", "rows", "references in another split"], ref_rows, "references-table")
        )
    else:
        parts.append("<p>No dataset root with split lists and reference CSVs among the sets.</p>")
    by_name = {s.name: s for s in sets}
    leaks = result.leaks
    for pr in result.pairs:
        key = f"{pr.a}~{pr.b}"
        parts.append(f"<h2>{html.escape(key)}</h2>")
        timings = ", ".join(f"{k} {v:.3g}" for k, v in pr.stats.get("timings", {}).items())
        parts.append(
            f"<p>Identities from: {html.escape(str(pr.stats.get('identities_from', '')))}. "
            f"Perceptual-hash matches that are not near-duplicates (faces disagree): "
            f"{pr.stats.get('phash_matches_not_near_duplicates', 0)}. Timings: {html.escape(timings)}.</p>"
        )
        a, b = by_name[pr.a], by_name[pr.b]
        cross_label = f"{b.name}→{a.name}" if len(a.vectors) > len(b.vectors) else f"{a.name}→{b.name}"
        same = {
            pr.a: result.same_nearest.get(pr.a, np.empty(0)),
            pr.b: result.same_nearest.get(pr.b, np.empty(0)),
        }
        finite = pr.nearest_cross[np.isfinite(pr.nearest_cross)]
        if any(len(v) for v in same.values()) or len(finite):
            cluster_sim = 1.0 - th.cluster_threshold if th.rule == "cluster" else None
            png = histogram_png(
                same,
                finite,
                cross_label,
                identity_sim,
                near_sim,
                f"nearest-face similarity, {key}",
                cluster_sim,
            )
            parts.append(
                f'<p><img class="hist" alt="similarity histogram {html.escape(key)}" src="{png_data_uri(png)}"></p>'
            )
        pair_leaks = leaks[(leaks["set_a"] == pr.a) & (leaks["set_b"] == pr.b)]
        has_images = pair_leaks["path_a"].notna().any() or pair_leaks["path_b"].notna().any()
        if len(pair_leaks) and not has_images:
            parts.append(f"<p>{len(pair_leaks)} leaked pairs; the sets carry no image files to show.</p>")
        elif len(pair_leaks):
            top = pair_leaks.head(result.summary["config"]["sheet_pairs"]).to_dict("records")
            parts.append(
                f"<p>Strongest {len(top)} of {len(pair_leaks)} leaked pairs (left: {html.escape(pr.a)}, "
                f"right: {html.escape(pr.b)}; exact first, then near-duplicates, then same identity):</p>"
            )
            parts.append(
                f'<p><img class="sheet" alt="leaked pairs {html.escape(key)}" src="{png_data_uri(contact_sheet_png(top))}"></p>'
            )
        else:
            parts.append("<p>No leaked pairs.</p>")
    parts.append("<h2>Provenance</h2>")
    parts.append(
        "<pre>"
        + html.escape(
            json.dumps({"config": summary["config"], "refface_version": summary["refface_version"]}, indent=1)
        )
        + "</pre>"
    )
    parts.append('<p id="render-check">rendering…</p>')
    parts.append(RENDER_CHECK)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, result: AuditResult, sets: Sequence[AuditSet]) -> None:
    """Write report.html atomically."""

    write_text(path, render_html(result, sets))
