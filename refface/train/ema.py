"""Exponential moving average of trainable weights, kept in fp32 and saved as safetensors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from refface.manifests.atomic import atomic_path, write_json


class EMA:
    """An fp32 shadow copy of every floating-point parameter of a set of named modules.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (the form
    diffusers' ``EMAModel`` uses), so early shadows are not dominated by the random initialisation.

    Args:
        modules: name -> module; parameters are addressed as ``"<name>.<param name>"``.
        decay: the asymptotic decay, e.g. 0.9999.
    """

    def __init__(self, modules: dict, decay: float) -> None:
        import torch

        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        for name, module in modules.items():
            for pname, p in unwrap_model(module).named_parameters():
                if p.requires_grad and p.is_floating_point():
                    self.shadow[f"{name}.{pname}"] = p.detach().to(torch.float32).clone()

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def update(self, modules: dict) -> None:
        """Move the shadow towards the current weights (call once per optimizer step)."""
        import torch

        d = self.current_decay()
        with torch.no_grad():
            for key, p in _named_params(modules):
                s = self.shadow[key]
                if s.device != p.device:
                    self.shadow[key] = s = s.to(p.device)
                s.lerp_(p.detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    def copy_to(self, modules: dict) -> None:
        """Overwrite the modules' parameters with the shadow weights."""
        import torch

        with torch.no_grad():
            for key, p in _named_params(modules):
                p.copy_(self.shadow[key].to(p.device, p.dtype))

    @contextlib.contextmanager
    def swapped_in(self, modules: dict) -> Iterator[None]:
        """Temporarily use the shadow weights (e.g. for a validation grid), then restore the live ones."""
        backup = {key: p.detach().clone() for key, p in _named_params(modules)}
        self.copy_to(modules)
        try:
            yield
        finally:
            import torch

            with torch.no_grad():
                for key, p in _named_params(modules):
                    p.copy_(backup[key])

    def module_state_dict(self, name: str) -> dict:
        """The shadow weights of one module, keyed like its ``state_dict`` (for ``load_state_dict``)."""
        prefix = f"{name}."
        return {k[len(prefix) :]: v for k, v in self.shadow.items() if k.startswith(prefix)}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for k in self.shadow:
            self.shadow[k] = state["shadow"][k].to(self.shadow[k].device, self.shadow[k].dtype).clone()

    def save(self, folder: str | Path, modules: dict | None = None) -> None:
        """Write ``<folder>/<module name>.safetensors`` per module plus ``ema.json`` (decay, updates).

        With ``modules`` (name -> module), each file is the module's full ``state_dict`` with the shadow
        weights in place of the trained parameters, so it loads with ``strict=True`` even when some
        parameters are frozen (not averaged) or the module has buffers.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = sorted({k.split(".", 1)[0] for k in self.shadow} | set(modules or {}))
        for name in names:
            full = dict(unwrap_model(modules[name]).state_dict()) if modules and name in modules else {}
            full.update(self.module_state_dict(name))
            tensors = {k: v.detach().cpu().contiguous() for k, v in full.items()}
            with atomic_path(folder / f"{name}.safetensors") as tmp:
                save_file(tensors, str(tmp))
        write_json(
            folder / "ema.json", {"decay": self.decay, "num_updates": self.num_updates, "modules": names}
        )

    def load(self, folder: str | Path) -> None:
        """Inverse of :meth:`save`."""
        import json

        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "ema.json").read_text())
        shadow = {}
        for name in meta["modules"]:
            for k, v in load_file(str(folder / f"{name}.safetensors")).items():
                if f"{name}.{k}" in self.shadow:  # files also hold frozen parameters and buffers
                    shadow[f"{name}.{k}"] = v
        self.load_state_dict({"decay": meta["decay"], "num_updates": meta["num_updates"], "shadow": shadow})


def unwrap_model(module):
    """Strip DDP / torch.compile wrappers so parameter names match the bare module."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif hasattr(module, "module") and module.__class__.__name__ in {
            "DistributedDataParallel",
            "DataParallel",
        }:
            module = module.module
        else:
            return module


def _named_params(modules: dict):
    for name, module in modules.items():
        for pname, p in unwrap_model(module).named_parameters():
            if p.requires_grad and p.is_floating_point():
                yield f"{name}.{pname}", p
