"""A differentiable torch module that runs an ONNX graph (the op set of insightface's ArcFace models).

onnx2torch would do this, but it imports torchvision, which this project does not install; the
recognizers need only a handful of ops, interpreted here with torch functions so gradients flow to
the input.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads: list[int] | None, ndim: int = 2) -> tuple[list[int], bool]:
    """ONNX pads [x1_begin, x2_begin, x1_end, x2_end] -> (symmetric padding, needs explicit F.pad)."""
    if not pads:
        return [0] * ndim, False
    begin, end = pads[:ndim], pads[ndim:]
    return (list(begin), False) if begin == end else (list(pads), True)


class OnnxGraphModule(nn.Module):
    """Runs an ONNX model's graph with torch ops; initializers become frozen buffers.

    Args:
        path: the ``.onnx`` file.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the graph uses an op this interpreter does not implement (named in the message).
    """

    SUPPORTED = {
        "Conv", "BatchNormalization", "PRelu", "Relu", "LeakyRelu", "Sigmoid", "Add", "Sub", "Mul", "Div",
        "Flatten", "Gemm", "MatMul", "Reshape", "Identity", "Constant", "Transpose", "MaxPool",
        "GlobalAveragePool", "Dropout",
    }  # fmt: skip

    def __init__(self, path: str | Path):
        import onnx
        from onnx import numpy_helper

        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        model = onnx.load(str(path))
        graph = model.graph
        unsupported = sorted({n.op_type for n in graph.node} - self.SUPPORTED)
        if unsupported:
            raise ValueError(f"{path} uses ONNX ops this reader does not implement: {unsupported}")
        self._names: dict[str, str] = {}
        for i, init in enumerate(graph.initializer):
            key = f"w{i}"
            self.register_buffer(key, torch.from_numpy(numpy_helper.to_array(init).copy()))
            self._names[init.name] = key
        inits = {i.name for i in graph.initializer}
        self.inputs = [i.name for i in graph.input if i.name not in inits]
        self.outputs = [o.name for o in graph.output]
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.inputs[0]: x}
        for name, key in self._names.items():
            env[name] = getattr(self, key)
        for op, ins, outs, at in self.nodes:
            args = [env[i] if i else None for i in ins]
            out = self._run(op, args, at)
            env[outs[0]] = out.to(x.device) if op == "Constant" else out
        return env[self.outputs[0]]

    @staticmethod
    def _run(op: str, a: list, at: dict) -> torch.Tensor:
        if op == "Conv":
            pads, explicit = _pads(at.get("pads"))
            x = a[0]
            if explicit:
                x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
                pads = [0, 0]
            return F.conv2d(
                x, a[1], a[2] if len(a) > 2 else None, stride=at.get("strides", [1, 1]), padding=pads,
                dilation=at.get("dilations", [1, 1]), groups=at.get("group", 1),
            )  # fmt: skip
        if op == "BatchNormalization":
            return F.batch_norm(a[0], a[3], a[4], a[1], a[2], training=False, eps=at.get("epsilon", 1e-5))
        if op == "PRelu":
            slope = a[1]
            if slope.dim() > 1:  # (C, 1, 1) in ONNX -> per-channel vector
                return torch.where(a[0] >= 0, a[0], a[0] * slope)
            return F.prelu(a[0], slope)
        if op == "Relu":
            return F.relu(a[0])
        if op == "LeakyRelu":
            return F.leaky_relu(a[0], at.get("alpha", 0.01))
        if op == "Sigmoid":
            return torch.sigmoid(a[0])
        if op in ("Add", "Sub", "Mul", "Div"):
            binary: dict[str, Callable[..., torch.Tensor]] = {
                "Add": torch.add,
                "Sub": torch.sub,
                "Mul": torch.mul,
                "Div": torch.div,
            }
            return binary[op](a[0], a[1])
        if op == "Flatten":
            return torch.flatten(a[0], at.get("axis", 1))
        if op == "Gemm":
            x, w = a[0], a[1]
            x = x.t() if at.get("transA", 0) else x
            w = w.t() if at.get("transB", 0) else w
            out = at.get("alpha", 1.0) * (x @ w)
            return out + at.get("beta", 1.0) * a[2] if len(a) > 2 and a[2] is not None else out
        if op == "MatMul":
            return a[0] @ a[1]
        if op == "Reshape":
            shape = [int(s) for s in a[1].tolist()]
            shape = [a[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
            return a[0].reshape(shape)
        if op in ("Identity", "Dropout"):
            return a[0]
        if op == "Constant":
            from onnx import numpy_helper

            return torch.from_numpy(numpy_helper.to_array(at["value"]).copy())
        if op == "Transpose":
            return a[0].permute(*at["perm"])
        if op == "MaxPool":
            pads, _ = _pads(at.get("pads"))
            return F.max_pool2d(a[0], at["kernel_shape"], at.get("strides", at["kernel_shape"]), pads)
        if op == "GlobalAveragePool":
            return a[0].mean(dim=(2, 3), keepdim=True)
        raise ValueError(f"unsupported ONNX op {op}")
