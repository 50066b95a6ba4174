"""``refface export hf``: a built root as a Hugging Face dataset folder (Parquet shards + README card).

Layout of ``OUT``::

    README.md                      dataset card; YAML header with configs and dataset_info
    data/<split>-00000-of-0000N.parquet

One config per split (``train``, ``val``, ``test``), each with one split of the same name. Images are
embedded as the ``datasets`` Image feature (the original file bytes, not re-encoded). A reference is
stored once, as a row of the same split: ``ref_indices`` are row numbers in that split's config and
``ref_paths`` their paths. Each degraded set of the root (``ROOT/lq/<set>/``) adds an LQ image column and
a JSON column of the parameters that made it. Written with pyarrow alone; ``datasets`` only reads it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from refface.console import track
from refface.manifests.atomic import atomic_path, write_text
from refface.mining.attributes import attrs_record

from .source import ExportSource, SplitRows, read_source

DATA_DIR = "data"
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PROMPTS = ("prompt", "negative_attribute_prompt", "negative_quality_prompt")


@dataclass(frozen=True)
class HFExportConfig:
    """Settings of ``refface export hf``.

    Attributes:
        shard_rows: rows per Parquet shard.
        row_group_rows: rows per Parquet row group (images are large: keep groups small).
        push_to_hub: repository id (``user/name``) to upload the folder to after writing; None = no upload.
        private: create the hub repository private.
    """

    shard_rows: int = 1000
    row_group_rows: int = 64
    push_to_hub: str | None = None
    private: bool = True

    def __post_init__(self) -> None:
        if self.shard_rows < 1 or self.row_group_rows < 1:
            raise ValueError("shard_rows and row_group_rows must be >= 1")


def lq_column(set_name: str) -> str:
    return "lq_" + re.sub(r"[^0-9A-Za-z]+", "_", set_name).strip("_")


def columns(source: ExportSource) -> list[tuple[str, pa.DataType, dict]]:
    """(name, arrow type, datasets feature) for every column, in order."""
    value = lambda dtype: {"dtype": dtype, "_type": "Value"}  # noqa: E731
    cols: list[tuple[str, pa.DataType, dict]] = [
        ("image", IMAGE_TYPE, {"_type": "Image"}),
        ("path", pa.string(), value("string")),
        ("identity", pa.int64(), value("int64")),
        ("in_split_list", pa.bool_(), value("bool")),
        ("is_target", pa.bool_(), value("bool")),
        ("ref_paths", pa.list_(pa.string()), {"feature": value("string"), "_type": "List"}),
        ("ref_indices", pa.list_(pa.int64()), {"feature": value("int64"), "_type": "List"}),
        ("lq_image", pa.string(), value("string")),
    ]
    for s in source.lq_sets:
        name = lq_column(s.name)
        cols.append((name, IMAGE_TYPE, {"_type": "Image"}))
        cols.append((f"{name}_params", pa.string(), value("string")))
    if source.attributes:
        cols.append(("attributes", pa.string(), value("string")))
        cols += [(p, pa.string(), value("string")) for p in PROMPTS]
    return cols


def _yaml_feature(name: str, feature: dict) -> dict:
    if feature["_type"] == "Image":
        return {"name": name, "dtype": "image"}
    if feature["_type"] == "List":
        return {"name": name, "list": feature["feature"]["dtype"]}
    return {"name": name, "dtype": feature["dtype"]}


def attributes_of(source: ExportSource, path: str) -> tuple[str, dict[str, str]]:
    """(attributes JSON, prompts) of an image, as the shard writer records them."""
    record = attrs_record(source.attributes.get(path))
    prompts = {p: str(record.pop(p, "")) for p in PROMPTS}
    return json.dumps(record, sort_keys=True), prompts


def _image(data: bytes | None, path: str | None) -> dict | None:
    return None if data is None else {"bytes": data, "path": path}


def split_records(source: ExportSource, rows: SplitRows, start: int, stop: int) -> dict[str, list]:
    """Column lists for rows ``start:stop`` of a split, images read from disk."""
    cols: dict[str, list] = {name: [] for name, _, _ in columns(source)}
    indices = rows.ref_indices()
    for i in range(start, stop):
        path = rows.paths[i]
        cols["image"].append(_image(source.file_of(path).read_bytes(), path))
        cols["path"].append(path)
        cols["identity"].append(rows.identity[i])
        cols["in_split_list"].append(rows.listed[i])
        cols["is_target"].append(rows.is_target[i])
        cols["ref_paths"].append(rows.refs[i])
        cols["ref_indices"].append(indices[i])
        cols["lq_image"].append(rows.lq_image[i])
        for s in source.lq_sets:
            name = lq_column(s.name)
            rel = s.files.get(path)
            lq_file = s.folder / rel if rel else None
            if lq_file is not None and lq_file.exists():
                cols[name].append(_image(lq_file.read_bytes(), rel))
                cols[f"{name}_params"].append(json.dumps(s.params[path], sort_keys=True))
            else:
                cols[name].append(None)
                cols[f"{name}_params"].append(None)
        if source.attributes:
            attrs, prompts = attributes_of(source, path)
            cols["attributes"].append(attrs)
            for p in PROMPTS:
                cols[p].append(prompts[p])
    return cols


def shard_names(split: str, n: int) -> list[str]:
    return [f"{DATA_DIR}/{split}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]


def export_hf(root: str | Path, out: str | Path, config: HFExportConfig | None = None) -> dict:
    """Write the Hugging Face dataset folder of a built root; returns a summary."""
    config = config or HFExportConfig()
    source = read_source(root)
    out = Path(out)
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    cols = columns(source)
    schema = pa.schema(
        [(name, dtype) for name, dtype, _ in cols],
        metadata={"huggingface": json.dumps({"info": {"features": {n: f for n, _, f in cols}}})},
    )
    info: dict[str, dict[str, Any]] = {}
    written: list[str] = []
    for split, rows in source.splits.items():
        n_rows = len(rows.paths)
        n_shards = max(1, math.ceil(n_rows / config.shard_rows))
        names = shard_names(split, n_shards)
        num_bytes = 0
        for k in track(range(n_shards), f"export hf {split}"):
            start, stop = k * config.shard_rows, min(n_rows, (k + 1) * config.shard_rows)
            table = pa.Table.from_pydict(split_records(source, rows, start, stop), schema=schema)
            num_bytes += table.nbytes
            with atomic_path(out / names[k]) as tmp:
                pq.write_table(table, tmp, row_group_size=config.row_group_rows)
        written += names
        info[split] = {
            "num_examples": n_rows,
            "num_bytes": int(num_bytes),
            "download_size": sum((out / n).stat().st_size for n in names),
        }
    # Shards of an earlier export with another shard count must not be read with the new ones.
    for stale in (out / DATA_DIR).glob("*.parquet"):
        if f"{DATA_DIR}/{stale.name}" not in written:
            stale.unlink()
    write_text(out / "README.md", dataset_card(source, cols, info))
    summary = {
        "out": str(out),
        **{f"{s} rows": v["num_examples"] for s, v in info.items()},
        "shards": len(written),
        "LQ sets": ", ".join(s.name for s in source.lq_sets) or "none",
        "bytes": sum(v["download_size"] for v in info.values()),
    }
    if config.push_to_hub:
        summary["pushed to"] = push_to_hub(out, config.push_to_hub, config.private)
    return summary


def _plain_dumper():
    import yaml

    class PlainDumper(yaml.SafeDumper):
        """Writes repeated blocks in full (no anchors/aliases) for the hub's card parser."""

        def ignore_aliases(self, data):
            return True

    return PlainDumper


def dataset_card(source: ExportSource, cols, info: dict[str, dict[str, Any]]) -> str:
    """README.md: YAML header (configs, dataset_info; the license is left for the owner) and a card."""
    import yaml

    _PlainDumper = _plain_dumper()
    features = [_yaml_feature(n, f) for n, _, f in cols]
    header = {
        "configs": [
            {"config_name": s, "data_files": [{"split": s, "path": f"{DATA_DIR}/{s}-*.parquet"}]}
            for s in info
        ],
        "dataset_info": [
            {
                "config_name": s,
                "features": features,
                "splits": [{"name": s, "num_bytes": v["num_bytes"], "num_examples": v["num_examples"]}],
                "download_size": v["download_size"],
                "dataset_size": v["num_bytes"],
            }
            for s, v in info.items()
        ],
    }
    lines = [
        "---",
        "# license: set the license of the images before sharing (e.g. cc-by-nc-sa-4.0); left to the owner.",
        yaml.dump(header, Dumper=_PlainDumper, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {source.root.name}",
        "",
        f"A reference-based face restoration dataset exported by refface from a `{source.kind or 'dataset'}` root.",
        "",
        "```python",
        "from datasets import load_dataset",
        'test = load_dataset("path/to/this/folder", "test", split="test")',
        'refs = [test[i]["image"] for i in test[0]["ref_indices"]]  # references are rows of the same split',
        "```",
        "",
        "| column | what |",
        "|---|---|",
        "| `image` | the image, original file bytes |",
        "| `path` | its path in the dataset root (relative to the image root) |",
        "| `identity` | identity number (-1: alone) |",
        "| `in_split_list` | listed in the split's image list (False: only a reference of a target) |",
        "| `is_target` | has a reference list |",
        "| `ref_paths`, `ref_indices` | the references: paths and row numbers in this split |",
        "| `lq_image` | the reference CSV's `lq_image` value |",
    ]
    for s in source.lq_sets:
        name = lq_column(s.name)
        lines.append(
            f"| `{name}`, `{name}_params` | LQ image of set `{s.name}` and its degradation parameters (JSON) |"
        )
    if source.attributes:
        lines.append(
            "| `attributes`, `prompt`, `negative_attribute_prompt`, `negative_quality_prompt` | face attributes (JSON) and text prompts |"
        )
    lines += ["", "| split | rows |", "|---|---|"] + [
        f"| {s} | {v['num_examples']} |" for s, v in info.items()
    ]
    card = source.root / "card.md"
    if card.exists():
        body = card.read_text().partition("\n")[2]
        body = re.sub(r"^## Plots.*", "", body, flags=re.S)  # the plots stay in the root
        lines += ["", "## Build card", "", body.strip()]
    return "\n".join(lines) + "\n"


def push_to_hub(folder: Path, repo: str, private: bool) -> str:
    """Upload the folder as a dataset repository (needs network access and a token)."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ValueError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from e
    api = HfApi()
    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset")
    return repo
