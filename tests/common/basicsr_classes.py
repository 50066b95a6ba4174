"""BasicSR's and GFPGAN's own dataset classes, imported without their packages' ``__init__``.

basicsr (a test dependency, installed with --no-deps) imports its whole training stack on
``import basicsr``, torchvision included; torchvision's wheels pull another torch build. The dataset
modules need only two torchvision names, ``normalize`` and ``make_grid``: when torchvision is absent
they come from a stand-in (``normalize`` written out in torch, ``make_grid`` unused here).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path


def _normalize(tensor, mean, std, inplace=False):
    import torch

    out = tensor if inplace else tensor.clone()
    mean = torch.as_tensor(mean, dtype=out.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=out.dtype).view(-1, 1, 1)
    return out.sub_(mean).div_(std)


def _make_grid(*args, **kwargs):
    raise NotImplementedError("not part of the stand-in torchvision")


def _provide_torchvision() -> None:
    try:
        importlib.import_module("torchvision.transforms.functional")
        return
    except Exception:  # noqa: BLE001 - absent (the CPU test environment): provide the two names used
        pass
    names = [
        "torchvision",
        "torchvision.utils",
        "torchvision.transforms",
        "torchvision.transforms.functional",
    ]
    mods = {n: types.ModuleType(n) for n in names}
    mods["torchvision.utils"].make_grid = _make_grid
    functional = mods["torchvision.transforms.functional"]
    functional.normalize = _normalize
    for name in ("adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation"):
        setattr(functional, name, _make_grid)  # colour jitter is off in the options we test
    mods["torchvision"].utils = mods["torchvision.utils"]
    mods["torchvision"].transforms = mods["torchvision.transforms"]
    mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]
    sys.modules.update(mods)


def _package(name: str, path: Path) -> types.ModuleType:
    module = sys.modules.get(name)
    if module is None or getattr(module, "__path__", None) is None:
        import importlib.machinery

        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        # A real spec, so importlib.util.find_spec() still answers for the package.
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__spec__.submodule_search_locations = [str(path)]
        sys.modules[name] = module
    return module


def basicsr_datasets() -> types.SimpleNamespace:
    """``PairedImageDataset`` from the installed basicsr (a test requirement: missing, the test fails)."""
    spec = importlib.util.find_spec("basicsr")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("basicsr is not installed: pip install --no-deps -r requirements-test.txt")
    base = Path(list(spec.submodule_search_locations)[0])
    _provide_torchvision()
    _package("basicsr", base)
    utils = _package("basicsr.utils", base / "utils")
    _package("basicsr.data", base / "data")
    for sub, names in {
        "file_client": ["FileClient"],
        "color_util": ["bgr2ycbcr"],
        "img_util": ["imfrombytes", "img2tensor"],
        "misc": ["scandir"],
        "logger": ["get_root_logger"],
    }.items():
        module = importlib.import_module(f"basicsr.utils.{sub}")
        for name in names:
            setattr(utils, name, getattr(module, name))
    paired = importlib.import_module("basicsr.data.paired_image_dataset")
    return types.SimpleNamespace(PairedImageDataset=paired.PairedImageDataset)


def gfpgan_ffhq_degradation_dataset():
    """GFPGAN's ``FFHQDegradationDataset`` (HQ-only training; a test requirement like basicsr)."""
    from refface.degradations.reference import _provide_functional_tensor

    spec = importlib.util.find_spec("gfpgan")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("gfpgan is not installed: pip install --no-deps -r requirements-test.txt")
    basicsr_datasets()
    _provide_functional_tensor()
    base = Path(list(spec.submodule_search_locations)[0])
    _package("gfpgan", base)
    _package("gfpgan.data", base / "data")
    return importlib.import_module("gfpgan.data.ffhq_degradation_dataset").FFHQDegradationDataset
