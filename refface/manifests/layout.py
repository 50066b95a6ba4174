"""File names inside a dataset root (no imports beyond the standard library: the CLI reads them too)."""

from __future__ import annotations

IMAGES = "images.parquet"
FACES = "faces.parquet"
EMBEDDINGS_NPY = "embeddings.npy"
EMBEDDINGS_TABLE = "embeddings.parquet"
# Written last, with the vectors: the embeddings' done-marker.
EMBEDDINGS_META = "embeddings.json"
# Sharded vectors (``refface embed --shard-rows``) live in this folder of the root by default.
EMBEDDING_SHARDS_DIR = "embeddings_shards"
IDENTITIES = "identities.parquet"
ATTRIBUTES = "attributes.parquet"
SPLITS_TABLE = "splits.parquet"
BUILD = "build.json"
CARD = "card.md"
STAGES_DIR = ".stages"
SPLITS = ("train", "val", "test")


def references_filename(split: str) -> str:
    """``train_references.csv`` etc., the names the published FFHQ-Ref files use."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return f"{split}_references.csv"


def split_filename(split: str) -> str:
    """``train_image.txt`` etc.: one image path per line, relative to the image root."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return f"{split}_image.txt"
