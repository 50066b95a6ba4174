"""Face detection: dlib landmarks in insightface order, face policies, SCRFD decoding, pre-aligned inputs."""

from __future__ import annotations

import numpy as np
import pytest

from refface.manifests.errors import ImageError
from refface.manifests.io import read_image
from refface.mining.align import FFHQ_TEMPLATE_512
from refface.mining.detect import (
    DETECTORS,
    Face,
    PrealignedDetector,
    ScrfdDetector,
    choose_face,
    detect,
    distance2bbox,
    distance2kps,
    make_detector,
    nms,
    scrfd_decode,
)


@pytest.fixture(scope="module")
def dlib_detector():
    return make_detector("dlib")


def _face(x0, y0, x1, y1, score=1.0):
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    lm = np.array([[cx - 5, cy - 5], [cx + 5, cy - 5], [cx, cy], [cx - 4, cy + 5], [cx + 4, cy + 5]], float)
    return Face(bbox=np.array([x0, y0, x1, y1], float), score=score, landmarks=lm)


def _assert_insightface_order(face: Face) -> None:
    le, re, nose, ml, mr = face.landmarks
    assert le[0] < re[0] and ml[0] < mr[0]  # left = image left
    assert max(le[1], re[1]) < nose[1] < min(ml[1], mr[1])  # eyes above nose above mouth
    x0, y0, x1, y1 = face.bbox
    margin = 0.25 * (x1 - x0)
    assert np.all(face.landmarks[:, 0] > x0 - margin) and np.all(face.landmarks[:, 0] < x1 + margin)
    assert np.all(face.landmarks[:, 1] > y0 - margin) and np.all(face.landmarks[:, 1] < y1 + margin)


def test_detectors_are_chosen_by_name():
    assert set(DETECTORS) == {"dlib", "scrfd", "prealigned"}
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("mtcnn")


def test_dlib_finds_lfw_faces_with_insightface_landmark_order(faces_dir, dlib_detector):
    img = read_image(faces_dir / "lfw/Alvaro_Uribe/Alvaro_Uribe_0001.jpg")
    assert img.shape[:2] == (250, 250)  # needs the upsampling to be found
    found = detect(dlib_detector, img)
    assert found.n_faces >= 1
    _assert_insightface_order(found.face)
    assert found.face.dlib_points is not None and found.face.dlib_points.shape == (5, 2)


def test_dlib_finds_tight_face_crops(faces_dir, dlib_detector):
    img = read_image(faces_dir / "faceapi_js_bbt/amy/amy1.png")
    found = detect(dlib_detector, img)
    _assert_insightface_order(found.face)


def test_dlib_coordinates_survive_downscaling_of_big_photos(faces_dir):
    img = read_image(faces_dir / "lfw/Alvaro_Uribe/Alvaro_Uribe_0001.jpg")
    full = detect(make_detector("dlib"), img).face
    big = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)  # 1000x1000, detected at 400 px
    scaled = detect(make_detector("dlib", max_side=400), big).face
    np.testing.assert_allclose(scaled.landmarks / 4.0, full.landmarks, atol=4.0)


def test_lfw_labeled_person_is_the_central_face(faces_dir, dlib_detector):
    img = read_image(faces_dir / "lfw/Ariel_Sharon/Ariel_Sharon_0004.jpg")
    found = detect(dlib_detector, img, policy="largest_central")
    assert found.n_faces >= 2
    centre = (found.face.bbox[:2] + found.face.bbox[2:]) / 2
    assert np.linalg.norm(centre - 125) < 30


def test_no_face_is_an_image_error(dlib_detector):
    blank = np.full((200, 200, 3), 128, np.uint8)
    with pytest.raises(ImageError, match="no face found"):
        detect(dlib_detector, blank)


def test_face_policies():
    shape = (400, 400, 3)
    big_corner = _face(0, 0, 150, 150)
    small_centre = _face(160, 160, 240, 240)
    faces = [big_corner, small_centre]
    assert choose_face(faces, shape, "largest") == 0
    assert choose_face(faces, shape, "central") == 1
    assert choose_face(faces, shape, "largest_central") == 1
    # A face nearly as central but much bigger wins under largest_central.
    big_centre = _face(110, 110, 300, 300)
    assert choose_face([small_centre, big_centre], shape, "largest_central") == 1
    assert choose_face([], shape) == -1
    with pytest.raises(ValueError, match="unknown face policy"):
        choose_face(faces, shape, "first")


def test_prealigned_uses_the_ffhq_template():
    img = np.zeros((256, 256, 3), np.uint8)
    found = detect(PrealignedDetector(), img)
    assert found.n_faces == 1
    np.testing.assert_allclose(found.face.landmarks, FFHQ_TEMPLATE_512 / 2)


# --------------------------------------------------------------------------------------- SCRFD
def test_scrfd_missing_weights_names_the_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as e:
        make_detector("scrfd")
    msg = str(e.value)
    assert "det_10g.onnx" in msg and "--model-root" in msg and "buffalo_l" in msg
    with pytest.raises(FileNotFoundError, match="det_10g.onnx"):
        make_detector("scrfd", tmp_path)


def test_distance_decoding():
    pts = np.array([[100.0, 50.0]])
    np.testing.assert_allclose(distance2bbox(pts, np.array([[10.0, 20.0, 30.0, 40.0]])), [[90, 30, 130, 90]])
    kps = distance2kps(pts, np.arange(10, dtype=float)[None])
    np.testing.assert_allclose(kps[0], [[100, 51], [102, 53], [104, 55], [106, 57], [108, 59]])


def test_nms_keeps_the_best_of_overlapping_boxes():
    dets = np.array([[0, 0, 100, 100, 0.9], [5, 5, 105, 105, 0.8], [200, 200, 260, 260, 0.7]], np.float32)
    assert nms(dets, 0.4) == [0, 2]


def _scrfd_outputs(size: int = 640) -> list[np.ndarray]:
    """Raw det_10g-style outputs with a face at stride 16, a weaker duplicate and a small face at stride 8."""
    outs_s, outs_b, outs_k = [], [], []
    for stride in (8, 16, 32):
        n = (size // stride) ** 2 * 2
        outs_s.append(np.zeros((n, 1), np.float32))
        outs_b.append(np.ones((n, 4), np.float32))
        outs_k.append(np.zeros((n, 10), np.float32))
    grid16 = size // 16
    i = (10 * grid16 + 12) * 2  # row 10, col 12, anchor 0 -> centre (192, 160)
    outs_s[1][i] = 0.95
    outs_b[1][i] = [3, 4, 3, 4]
    outs_k[1][i] = [-1.5, -1, 1.5, -1, 0, 0.5, -1, 2, 1, 2]
    outs_s[1][i + 1] = 0.90  # same place, anchor 1: suppressed by NMS
    outs_b[1][i + 1] = [3, 4, 3.2, 4]
    grid8 = size // 8
    j = (60 * grid8 + 70) * 2  # centre (560, 480)
    outs_s[0][j] = 0.6
    outs_b[0][j] = [2, 2, 2, 2]
    return outs_s + outs_b + outs_k


def test_scrfd_decode_boxes_landmarks_and_nms():
    dets, kps = scrfd_decode(_scrfd_outputs(), (640, 640))
    assert dets.shape == (2, 5) and kps.shape == (2, 5, 2)
    np.testing.assert_allclose(dets[0], [144, 96, 240, 224, 0.95], rtol=1e-6)
    np.testing.assert_allclose(kps[0, 0], [192 - 24, 160 - 16])
    np.testing.assert_allclose(dets[1, :4], [544, 464, 576, 496])


def _tiny_scrfd(path, outputs):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names = [f"out{k}" for k in range(9)]
    inits = [numpy_helper.from_array(o, f"c{k}") for k, o in enumerate(outputs)]
    nodes = [helper.make_node("Identity", [f"c{k}"], [names[k]]) for k in range(9)]
    # Reading the input keeps it in the graph; the detections themselves are fixed.
    nodes.append(helper.make_node("ReduceMean", ["input.1"], ["unused"], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 640, 640])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, list(o.shape))
            for n, o in zip(names, outputs, strict=True)
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_scrfd_detector_letterboxes_and_scales_back(tmp_path):
    _tiny_scrfd(tmp_path / "det_10g.onnx", _scrfd_outputs())
    det = make_detector("scrfd", tmp_path)  # a folder holding det_10g.onnx
    assert isinstance(det, ScrfdDetector)
    img = np.zeros((320, 160, 3), np.uint8)  # portrait: letterboxed to 640 high, scale 2
    faces = det(img)
    assert len(faces) == 2
    np.testing.assert_allclose(faces[0].bbox, [72, 48, 120, 112], rtol=1e-6)
    assert faces[0].score == pytest.approx(0.95)
    np.testing.assert_allclose(faces[0].landmarks[2], [96, 80 + 4], rtol=1e-6)
    found = detect(det, img, policy="largest")
    assert found.chosen == 0 and found.n_faces == 2


def test_dlib_mmod_cnn_detector(faces_dir):
    img = read_image(faces_dir / "lfw/Alvaro_Uribe/Alvaro_Uribe_0001.jpg")
    found = detect(make_detector("dlib", model="mmod"), img)
    _assert_insightface_order(found.face)
    with pytest.raises(ValueError, match="hog' or 'mmod"):
        make_detector("dlib", model="cnn")
