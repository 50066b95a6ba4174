"""A tiny random ONNX model with ArcFace's signature (N x 3 x 112 x 112 -> N x 512), built offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def build_tiny_arcface(
    path: str | Path, seed: int = 0, dim: int = 512, self_normalizing: bool = False, fixed_batch: bool = False
) -> Path:
    """Write a small ONNX model shaped like insightface's recognition models.

    Graph: [Sub -> Mul when ``self_normalizing``] -> Conv(3->8, k=16, s=16) -> Flatten -> Gemm(392->dim).
    With ``self_normalizing`` the first nodes are named ``Sub``/``Mul`` like insightface's older
    exports, which makes the embedder feed raw 0..255 pixels (mean 0, std 1).

    Args:
        path: output .onnx file.
        seed: weights seed (different seeds give different fingerprints).
        dim: embedding size.
        self_normalizing: put (x - 127.5) * (1/127.5) inside the graph.
        fixed_batch: declare batch size 1 instead of a dynamic batch.

    Returns:
        The written path.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = rng.standard_normal((8, 3, 16, 16)).astype(np.float32) * 0.05
    conv_b = np.zeros(8, np.float32)
    fc_w = rng.standard_normal((8 * 7 * 7, dim)).astype(np.float32) * 0.05
    fc_b = rng.standard_normal(dim).astype(np.float32) * 0.01
    inits = [
        numpy_helper.from_array(conv_w, "conv_w"),
        numpy_helper.from_array(conv_b, "conv_b"),
        numpy_helper.from_array(fc_w, "fc_w"),
        numpy_helper.from_array(fc_b, "fc_b"),
    ]
    nodes = []
    x = "data"
    if self_normalizing:
        inits += [
            numpy_helper.from_array(np.array(127.5, np.float32), "sub_c"),
            numpy_helper.from_array(np.array(1 / 127.5, np.float32), "mul_c"),
        ]
        nodes += [
            helper.make_node("Sub", ["data", "sub_c"], ["sub_out"], name="Sub_0"),
            helper.make_node("Mul", ["sub_out", "mul_c"], ["mul_out"], name="Mul_1"),
        ]
        x = "mul_out"
    nodes += [
        helper.make_node(
            "Conv", [x, "conv_w", "conv_b"], ["conv"], name="Conv_2", kernel_shape=[16, 16], strides=[16, 16]
        ),
        helper.make_node("Flatten", ["conv"], ["flat"], name="Flatten_3", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc1"], name="Gemm_4"),
    ]
    batch = 1 if fixed_batch else "None"
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
