"""The shard index: one JSON per split listing every shard with its sample count, bytes and sha256."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from refface.manifests.atomic import write_json

SHARD_INDEX_VERSION = 1
SHARD_INDEX_FORMAT = "refface-shards"


def index_path(folder: str | os.PathLike, split: str) -> Path:
    """Where the index of ``split`` lives inside a shard folder."""
    return Path(folder) / f"index-{split}.json"


def shard_name(split: str, number: int) -> str:
    """File name of shard ``number`` of ``split`` (zero-padded so names sort in write order)."""
    return f"{split}-{number:06d}.tar"


def shard_record_path(folder: str | os.PathLike, name: str) -> Path:
    """The per-shard done-record written beside a finished shard (used to resume a killed run)."""
    return Path(folder) / ".done" / f"{name}.json"


class ShardError(Exception):
    """A shard that is missing, truncated or does not match its index; the message names it."""


@dataclass(frozen=True)
class ShardEntry:
    """One finished shard: its file name (relative to the folder) and what it holds."""

    name: str
    samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str


@dataclass
class ShardIndex:
    """What ``refface shards`` wrote for one split; written last, so a folder is valid once it exists."""

    split: str
    shards: list[ShardEntry]
    config: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    version: int = SHARD_INDEX_VERSION
    format: str = SHARD_INDEX_FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_samples"] = self.num_samples
        data["num_bytes"] = self.num_bytes
        return data

    def write(self, folder: str | os.PathLike) -> Path:
        path = index_path(folder, self.split)
        write_json(path, self.to_dict())
        return path

    def shard_paths(self, folder: str | os.PathLike) -> list[Path]:
        return [Path(folder) / s.name for s in self.shards]


def read_shard_index(path: str | os.PathLike) -> ShardIndex:
    """Read and validate a shard index file.

    Raises:
        FileNotFoundError: the index does not exist (the shard folder is incomplete).
        ValueError: the file is not a refface shard index of a version this code reads.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"shard index not found: {path}; the shard folder is incomplete - rerun `refface shards` "
            "(it resumes from the finished shards)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if data.get("format") != SHARD_INDEX_FORMAT:
        raise ValueError(f"{path} is not a refface shard index (format={data.get('format')!r})")
    if data.get("version") != SHARD_INDEX_VERSION:
        raise ValueError(
            f"{path} has shard index version {data.get('version')}, this refface reads "
            f"{SHARD_INDEX_VERSION}; rewrite the shards with this version"
        )
    shards = [ShardEntry(**s) for s in data["shards"]]
    return ShardIndex(
        split=data["split"], shards=shards, config=data.get("config", {}), inputs=data.get("inputs", {})
    )


def find_indexes(folder: str | os.PathLike) -> dict[str, Path]:
    """Every split's index in a shard folder, as {split: path}."""
    found = {}
    for path in sorted(Path(folder).glob("index-*.json")):
        found[path.stem[len("index-") :]] = path
    return found
