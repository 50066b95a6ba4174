"""pyiqa's own metric modules, loaded from the installed package files for parity checks.

Importing ``pyiqa`` pulls in every metric and with them torchvision, timm and the model hubs. The few
modules the ReF-LDM evaluation relies on (``ssim_arch``, ``psnr_arch``, ``niqe_arch``, ``fid_arch`` and
the colour / MATLAB helpers under them) need none of that, so they are executed from their files, with
stand-ins for the three helpers that only locate or download weights. The stand-ins never download:
a metric that would need a file must be given its path.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

from refface.manifests.io import list_images

INSTALL_HINT = "pip install --no-deps pyiqa==0.1.16 clean-fid==0.1.35"
MODULES = ("ssim_arch", "psnr_arch", "niqe_arch", "fid_arch")


class ReferenceUnavailable(RuntimeError):
    """pyiqa is not installed; the message says how to install it."""


def _no_download(url, *args, **kwargs):
    raise FileNotFoundError(f"pyiqa reference modules do not download; give the file of {url} by path")


def _scandir_images(folder):
    return [str(Path(folder) / p) for p in list_images(folder)]


def _stand_ins() -> dict[str, types.ModuleType]:
    arch_util = types.ModuleType("pyiqa.archs.arch_util")
    arch_util.get_url_from_name = lambda name, *a, **k: name  # type: ignore[attr-defined]
    arch_util.load_pretrained_network = _no_download  # type: ignore[attr-defined]
    download = types.ModuleType("pyiqa.utils.download_util")
    download.load_file_from_url = _no_download  # type: ignore[attr-defined]
    img_util = types.ModuleType("pyiqa.utils.img_util")
    img_util.scandir_images = _scandir_images  # type: ignore[attr-defined]
    inception = types.ModuleType("pyiqa.archs.inception")

    class InceptionV3:  # pyiqa's needs torchvision; parity runs pass their own feature network
        BLOCK_INDEX_BY_DIM = {2048: 3}

        def __init__(self, *a, **k):
            raise ReferenceUnavailable("pyiqa's InceptionV3 needs torchvision; pass a feature network")

    inception.InceptionV3 = InceptionV3  # type: ignore[attr-defined]
    return {m.__name__: m for m in (arch_util, download, img_util, inception)}


def load_pyiqa() -> types.SimpleNamespace:
    """pyiqa's metric modules as ``ns.ssim_arch``, ``ns.psnr_arch``, ``ns.niqe_arch``, ``ns.fid_arch``.

    The ``pyiqa`` names are removed from ``sys.modules`` afterwards, so a real ``import pyiqa`` later in
    the process is not affected.

    Raises:
        ReferenceUnavailable: pyiqa is not installed (the message has the install line).
    """
    spec = importlib.util.find_spec("pyiqa")
    if spec is None or not spec.submodule_search_locations:
        raise ReferenceUnavailable(f"pyiqa is not installed; install it without its deps: {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0])
    before = set(sys.modules)
    saved = {k: sys.modules[k] for k in before if k == "pyiqa" or k.startswith("pyiqa.")}
    for k in saved:
        del sys.modules[k]
    try:
        for name, sub in (("pyiqa", root), ("pyiqa.archs", root / "archs"), ("pyiqa.utils", root / "utils")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(sub)]
            sys.modules[name] = pkg
        sys.modules.update(_stand_ins())
        loaded: dict[str, Any] = {m: importlib.import_module(f"pyiqa.archs.{m}") for m in MODULES}
        loaded["color_util"] = importlib.import_module("pyiqa.utils.color_util")
        loaded["matlab_utils"] = importlib.import_module("pyiqa.matlab_utils")
        loaded["root"] = root
    finally:
        for k in [k for k in sys.modules if k == "pyiqa" or k.startswith("pyiqa.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return types.SimpleNamespace(**loaded)
