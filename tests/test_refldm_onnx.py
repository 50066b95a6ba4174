"""The ONNX interpreter behind differentiable ArcFace: matches onnxruntime and passes gradients."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from common.tiny_refldm import _one_thread  # noqa: F401  (autouse fixture)
from onnx import TensorProto, helper, numpy_helper

from refface.train.refldm.identity import load_arcface
from refface.train.refldm.onnx_torch import OnnxGraphModule


def iresnet_like_onnx(path, seed: int = 0) -> None:
    """A small graph with the ops and layouts of insightface's iresnet exports."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, positive=False):
        arr = rng.normal(size=shape).astype(np.float32) * 0.3
        return numpy_helper.from_array(np.abs(arr) + 0.5 if positive else arr, name)

    inits = [
        numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
        numpy_helper.from_array(np.array(1 / 127.5, np.float32), "scale"),
        init("c1w", 4, 3, 3, 3), init("c1b", 4),
        init("bn_s", 4, positive=True), init("bn_b", 4), init("bn_m", 4), init("bn_v", 4, positive=True),
        init("slope", 4, 1, 1),
        init("c2w", 8, 4, 3, 3), init("c2b", 8),
        init("dsw", 8, 4, 1, 1),
        init("fcw", 5, 8 * 4 * 4), init("fcb", 5),
        init("f_s", 5, positive=True), init("f_b", 5), init("f_m", 5), init("f_v", 5, positive=True),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["n0"]),
        helper.make_node("Mul", ["n0", "scale"], ["n1"]),
        helper.make_node("Conv", ["n1", "c1w", "c1b"], ["n2"], pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["n2", "bn_s", "bn_b", "bn_m", "bn_v"], ["n3"], epsilon=1e-5),
        helper.make_node("PRelu", ["n3", "slope"], ["n4"]),
        helper.make_node("Conv", ["n4", "c2w", "c2b"], ["n5"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["n4", "dsw"], ["n6"], strides=[2, 2]),
        helper.make_node("Add", ["n5", "n6"], ["n7"]),
        helper.make_node("Flatten", ["n7"], ["n8"], axis=1),
        helper.make_node("Gemm", ["n8", "fcw", "fcb"], ["n9"], transB=1),
        helper.make_node("BatchNormalization", ["n9", "f_s", "f_b", "f_m", "f_v"], ["y"], epsilon=1e-5),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_iresnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_interpreter_matches_onnxruntime_and_is_differentiable(tmp_path):
    path = tmp_path / "tiny.onnx"
    iresnet_like_onnx(path)
    x = np.random.default_rng(1).uniform(0, 255, (2, 3, 8, 8)).astype(np.float32)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    module = OnnxGraphModule(path)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = module(xt)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert xt.grad is not None and float(xt.grad.abs().sum()) > 0
    # load_arcface picks the interpreter for .onnx files and freezes it.
    arc = load_arcface(path)
    assert not any(b.requires_grad for b in arc.buffers()) and not arc.training


def test_unsupported_ops_and_missing_files_are_named(tmp_path):
    node = helper.make_node("Softmax", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), str(tmp_path / "soft.onnx"))
    with pytest.raises(ValueError, match="Softmax"):
        OnnxGraphModule(tmp_path / "soft.onnx")
    with pytest.raises(FileNotFoundError, match="w600k_r50.onnx"):
        load_arcface(tmp_path / "w600k_r50.onnx")
