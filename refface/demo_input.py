"""The default input: Labeled Faces in the Wild, fetched once into a cache, or a local folder."""

from __future__ import annotations

import os
import tarfile
import urllib.request
from pathlib import Path

LFW_URL = "https://vis-www.cs.umass.edu/lfw/lfw-deepfunneled.tgz"
CACHE_DIR = Path(os.environ.get("REFFACE_CACHE", Path.home() / ".cache" / "refface"))


class SampleUnavailable(RuntimeError):
    pass


def resolve_sample_dir(data: str | os.PathLike | None = None) -> Path:
    """The folder of images to use: ``data`` if given, else $REFFACE_SAMPLE_DIR, else cached LFW.

    Raises:
        SampleUnavailable: the download failed; the message says how to use a local folder.
    """
    if data:
        path = Path(data)
        if not path.is_dir():
            raise SampleUnavailable(f"input folder not found: {path}")
        return path
    env = os.environ.get("REFFACE_SAMPLE_DIR")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise SampleUnavailable(f"REFFACE_SAMPLE_DIR={env} is not a folder")
        return path
    return download_lfw()


def download_lfw(cache_dir: Path = CACHE_DIR, url: str = LFW_URL) -> Path:
    target = cache_dir / "lfw-deepfunneled"
    if (target / ".complete").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / "lfw-deepfunneled.tgz"
    try:
        if not archive.exists():
            tmp = archive.with_suffix(".part")
            urllib.request.urlretrieve(url, tmp)  # noqa: S310 - fixed official URL
            tmp.rename(archive)
        with tarfile.open(archive) as tar:
            tar.extractall(cache_dir, filter="data")
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise SampleUnavailable(
            f"could not download the default sample (LFW) from {url}: {e}.\n"
            "This machine may be offline. Point refface at a local folder of face photos instead:\n"
            "  REFFACE_SAMPLE_DIR=/path/to/faces make demo      (or: make demo DATA=/path/to/faces)\n"
            "The folder may hold a labels.csv (columns: path, identity) to score the clustering."
        ) from e
    extracted = cache_dir / "lfw-deepfunneled"
    (extracted / ".complete").touch()
    return extracted
