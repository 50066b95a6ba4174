"""Differentiable ArcFace (a torch iresnet) and the timestep-scaled identity loss."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from refface.train.refldm.onnx_torch import OnnxGraphModule

logger = logging.getLogger(__name__)

# ArcFace is applied to the centre of an FFHQ-aligned face, resized to its 112x112 input.
CROP_BOX = (0.0625, 0.9375)
ARCFACE_SIZE = 112
IRESNET_LAYERS = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3], "r100": [3, 13, 30, 3]}


class IBasicBlock(nn.Module):
    """insightface's pre-activation residual block (BN-conv-BN-PReLU-conv-BN)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """The arcface_torch iresnet (same parameter names, so its ``.pth`` state dicts load directly).

    Input: RGB ``(B, 3, 112, 112)`` in [-1, 1]; output: ``(B, embedding_size)`` unnormalized.
    """

    def __init__(
        self, layers: list[int], widths: tuple[int, ...] = (64, 128, 256, 512), embedding_size: int = 512
    ):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = self._make_layer(widths[0], layers[0], stride=2)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(widths[3] * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-05)
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(arch: str = "r50", widths: tuple[int, ...] = (64, 128, 256, 512)) -> IResNet:
    """An untrained iresnet of the named depth (``r18``/``r34``/``r50``/``r100``)."""
    if arch not in IRESNET_LAYERS:
        raise ValueError(f"unknown iresnet arch {arch!r}; choose one of {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[arch], widths=widths)


def load_arcface(
    path: str | Path, arch: str = "r50", widths: tuple[int, ...] = (64, 128, 256, 512)
) -> nn.Module:
    """Load a differentiable ArcFace recognizer from a local file, frozen and in eval mode.

    Args:
        path: an insightface ONNX model (e.g. ``w600k_r50.onnx``, run by a torch graph interpreter) or an
            arcface_torch ``.pth`` state dict for ``arch``.
        arch: iresnet depth for ``.pth`` files.
        widths: iresnet stage widths for ``.pth`` files.

    Raises:
        FileNotFoundError: the file is missing; the message says where to get it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"ArcFace weights not found: {path}. Place insightface's buffalo_l 'w600k_r50.onnx' "
            "(or an arcface_torch iresnet '.pth' state dict) there and pass its path (identity.arcface)."
        )
    if path.suffix.lower() == ".onnx":
        model: nn.Module = OnnxGraphModule(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        model = iresnet(arch, widths=tuple(widths))
        model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model


RESIZE_MODES = ("area", "bilinear")


def arcface_input(images: torch.Tensor, size: int = ARCFACE_SIZE, resize: str = "area") -> torch.Tensor:
    """Centre crop [0.0625, 0.9375] of aligned faces in [-1, 1], resized to ``size`` (differentiable).

    ``resize``: ``area`` (the official identity loss: ``interpolate(mode="area")``) or ``bilinear``
    (antialiased).
    """
    h, w = images.shape[-2:]
    y0, y1 = int(CROP_BOX[0] * h), int(CROP_BOX[1] * h)
    x0, x1 = int(CROP_BOX[0] * w), int(CROP_BOX[1] * w)
    crop = images[..., y0:y1, x0:x1]
    if resize == "area":
        return F.interpolate(crop, size=(size, size), mode="area")
    if resize == "bilinear":
        return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"identity resize must be one of {RESIZE_MODES}, got {resize!r}")


def embed(recognizer: nn.Module, images: torch.Tensor, resize: str = "area") -> torch.Tensor:
    """L2-normalized identity embeddings of aligned faces ``(B, 3, H, W)`` in [-1, 1].

    The images are cast to the recognizer's dtype (a frozen fp32 ArcFace stays fp32 under bf16).
    """
    dtype = next(recognizer.parameters(), images).dtype
    return F.normalize(recognizer(arcface_input(images, resize=resize).to(dtype)).float(), dim=-1)


def identity_loss(
    recognizer: nn.Module,
    pred_images: torch.Tensor,
    target_images: torch.Tensor,
    alphas_cumprod_t: torch.Tensor,
    weight: float = 0.1,
    resize: str = "area",
) -> torch.Tensor:
    """Per-sample timestep-scaled identity loss ``weight·√ᾱ_t·(1 − cos(R(x̂0), R(x*)))``.

    Args:
        recognizer: frozen ArcFace; gradients flow through it into ``pred_images``.
        pred_images: x̂0 decoded by the autoencoder, ``(B, 3, H, W)`` in [-1, 1].
        target_images: x*, the autoencoder's reconstruction of the ground truth.
        alphas_cumprod_t: ``(B,)`` ᾱ at each sample's timestep: noisy steps, whose x̂0 is blurry,
            weigh less.
        weight: the loss weight (0.1 in the paper).
        resize: how the crop is resized to 112 (see :func:`arcface_input`).

    Returns:
        ``(B,)`` loss per sample.
    """
    with torch.no_grad():
        target = embed(recognizer, target_images, resize)
    pred = embed(recognizer, pred_images, resize)
    cos = (pred * target).sum(dim=-1)
    return weight * alphas_cumprod_t.float().sqrt() * (1.0 - cos)
