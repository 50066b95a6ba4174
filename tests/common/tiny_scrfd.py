"""A tiny random ONNX model with SCRFD's signature (det_10g.onnx: 9 outputs, strides 8/16/32, 2 anchors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

STRIDES = (8, 16, 32)
ANCHORS = 2


def build_tiny_scrfd(path: str | Path, size: int | None = 160, seed: int = 0) -> Path:
    """Write a small ONNX detector whose outputs are laid out exactly like insightface's SCRFD.

    For each stride ``s`` one strided convolution per head reads the (x - 127.5) / 128 input:
    scores ``(H/s * W/s * 2, 1)`` through a sigmoid, box distances ``(.., 4)`` through a softplus
    (positive, in stride units), landmark offsets ``(.., 10)``. Outputs come in insightface's order
    (scores x3, boxes x3, landmarks x3) without a batch axis, as det_10g.onnx has them.

    Args:
        path: output .onnx file.
        size: fixed input side (None: dynamic height and width, like det_10g.onnx).
        seed: weights seed.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        fan_in = 3 * s * s
        for head, per_anchor in (("score", 1), ("bbox", 4), ("kps", 10)):
            name = f"{head}{s}"
            # Scores get a wider spread so some pass the 0.5 threshold and some do not.
            gain = (3.0 if head == "score" else 1.0) / np.sqrt(fan_in)
            w = (rng.standard_normal((ANCHORS * per_anchor, 3, s, s)) * gain).astype(np.float32)
            b = (rng.standard_normal(ANCHORS * per_anchor) * 0.5).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(b, f"{name}_b")]
            nodes.append(
                helper.make_node(
                    "Conv",
                    ["input.1", f"{name}_w", f"{name}_b"],
                    [f"{name}_conv"],
                    kernel_shape=[s, s],
                    strides=[s, s],
                )
            )
            act = {"score": "Sigmoid", "bbox": "Softplus", "kps": "Identity"}[head]
            nodes.append(helper.make_node(act, [f"{name}_conv"], [f"{name}_act"]))
            nodes.append(helper.make_node("Transpose", [f"{name}_act"], [f"{name}_t"], perm=[0, 2, 3, 1]))
            inits.append(numpy_helper.from_array(np.array([-1, per_anchor], np.int64), f"{name}_shape"))
            nodes.append(helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [name]))
            rows = None if size is None else (size // s) ** 2 * ANCHORS
            outputs[head].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, per_anchor]))
    side = size if size is not None else None
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, side, side])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
