"""LPIPS (v0.1, VGG16) written out in torch: VGG16 features + the learned linear head, weights from local files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# conv widths of VGG16's five stages and the index (in torchvision's ``features``) of each stage's
# last ReLU, where LPIPS taps the features: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_CONVS = (2, 2, 3, 3, 3)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """VGG16's convolutional trunk with torchvision's ``features.N`` parameter names."""

    def __init__(self, widths: tuple[int, ...] = VGG16_WIDTHS):
        super().__init__()
        layers: list[nn.Module] = []
        self.taps: list[int] = []
        cin = 3
        for stage, (width, convs) in enumerate(zip(widths, VGG16_CONVS, strict=True)):
            if stage:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(convs):
                layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU(inplace=False)]
                cin = width
            self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.widths = tuple(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
            if i == self.taps[-1]:
                break
        return out


class LPIPS(nn.Module):
    """Learned perceptual distance between images in [-1, 1]; returns ``(B,)``.

    Build an untrained one with ``LPIPS(widths)`` (tests) or the real one with :meth:`from_files`.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, widths: tuple[int, ...] = VGG16_WIDTHS):
        super().__init__()
        self.net = VGG16Features(widths)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        # The lpips package's head: per-layer 1x1 conv (after dropout) with non-negative weights.
        lins = [nn.Conv2d(w, 1, 1, bias=False) for w in widths]
        for lin in lins:
            nn.init.uniform_(lin.weight, 0.0, 1.0 / lin.weight.shape[1])
        self.lins = nn.ModuleList(lins)

    @classmethod
    def from_files(cls, backbone: str | Path, head: str | Path) -> LPIPS:
        """Load torchvision's VGG16 weights (``vgg16-397923af.pth``) and the lpips head (``vgg.pth``).

        Raises:
            FileNotFoundError: naming the missing file and where it comes from.
        """
        backbone, head = Path(backbone), Path(head)
        if not backbone.exists():
            raise FileNotFoundError(
                f"LPIPS backbone weights not found: {backbone}. Place torchvision's ImageNet VGG16 "
                "'vgg16-397923af.pth' there."
            )
        if not head.exists():
            raise FileNotFoundError(
                f"LPIPS head weights not found: {head}. Place the lpips package's 'weights/v0.1/vgg.pth' there."
            )
        model = cls()
        state = torch.load(backbone, map_location="cpu", weights_only=True)
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        model.net.load_state_dict(features, strict=False)
        missing = [k for k in model.net.state_dict() if k not in features]
        if missing:
            raise ValueError(f"{backbone} is not a torchvision VGG16 state dict (missing {missing[:3]})")
        lin_state = torch.load(head, map_location="cpu", weights_only=True)
        for i, lin in enumerate(model.lins):
            assert isinstance(lin, nn.Conv2d)
            key = f"lin{i}.model.1.weight"
            if key not in lin_state:
                raise ValueError(f"{head} is not an lpips v0.1 vgg head (missing {key})")
            lin.weight.data.copy_(lin_state[key])
        return model.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Distance per image pair; ``mask`` ``(B, 1, H, W)`` restricts the spatial average to a region."""
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = torch.zeros(())
        for a, b, lin in zip(fx, fy, self.lins, strict=True):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = lin((a - b).pow(2))  # (B, 1, h, w)
            if mask is None:
                total = total + d.mean(dim=(1, 2, 3))
            else:
                m = nn.functional.interpolate(mask.float(), size=d.shape[-2:], mode="area")
                total = total + (d * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1e-8)
        return total
