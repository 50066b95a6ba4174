"""Face alignment from 5 landmarks: ArcFace 112x112 crops and FFHQ-style crops at any size."""

from __future__ import annotations

import numpy as np

# insightface ``face_align.arcface_dst``: where the 5 points (left eye, right eye, nose, left mouth
# corner, right mouth corner; left/right as seen in the image) land in a 112x112 ArcFace crop.
ARCFACE_DST = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

# facexlib's FFHQ 5-point template for 512x512 crops (same point order); scaled for other sizes.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)

# facexlib pads FFHQ crops with this grey, so faces near the border look like its training data.
FFHQ_BORDER_VALUE = (135, 133, 132)


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` points onto ``dst`` (Umeyama, 1991).

    This is what ``skimage.transform.SimilarityTransform.estimate`` computes, which insightface's
    ``norm_crop`` uses, step for step and in the same precision: float32 when both point sets are
    float32 (skimage keeps its inputs' dtype), float64 otherwise.

    Args:
        src: (N, 2) source points.
        dst: (N, 2) destination points.
        estimate_scale: also fit a uniform scale (True for a similarity transform).

    Returns:
        (3, 3) homogeneous matrix ``T`` with ``dst ~ T @ [src, 1]``.
    """
    src, dst = np.asarray(src), np.asarray(dst)
    dtype = np.float32 if src.dtype == np.float32 and dst.dtype == np.float32 else np.float64
    src, dst = src.astype(dtype, copy=False), dst.astype(dtype, copy=False)
    num, dim = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_demean = src - src_mean
    dst_demean = dst - dst_mean
    a = dst_demean.T @ src_demean / num
    d = np.ones((dim,), dtype=np.float64)
    if np.linalg.det(a) < 0:
        d[dim - 1] = -1
    t = np.eye(dim + 1, dtype=np.float64)
    u, s, vt = np.linalg.svd(a)
    rank = int(np.count_nonzero(s > s.max() * max(a.shape) * np.finfo(float).eps))
    if rank == 0:
        raise ValueError("degenerate landmarks: all points coincide")
    if rank == dim - 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            t[:dim, :dim] = u @ vt
        else:
            s_last = d[dim - 1]
            d[dim - 1] = -1
            t[:dim, :dim] = u @ np.diag(d) @ vt
            d[dim - 1] = s_last
    else:
        t[:dim, :dim] = u @ np.diag(d) @ vt
    scale = 1.0 / src_demean.var(axis=0).sum() * (s @ d) if estimate_scale else 1.0
    t[:dim, dim] = dst_mean - scale * (t[:dim, :dim] @ src_mean.T)
    t[:dim, :dim] *= scale
    return t


def similarity_matrix(landmarks: np.ndarray, template: np.ndarray) -> np.ndarray:
    """The (2, 3) affine matrix of the similarity transform taking ``landmarks`` onto ``template``."""
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if not np.all(np.isfinite(landmarks)):
        raise ValueError("landmarks contain NaN or infinity")
    return umeyama(landmarks, template)[:2, :]


def warp(
    img: np.ndarray, matrix: np.ndarray, size: int, border_value: tuple[int, int, int] = (0, 0, 0)
) -> np.ndarray:
    """Warp ``img`` with a (2, 3) affine matrix into a ``size`` x ``size`` crop (bilinear)."""
    import cv2

    return cv2.warpAffine(
        img,
        matrix,
        (size, size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=border_value,
    )


def arcface_template(size: int = 112) -> np.ndarray:
    """``arcface_dst`` for a crop of ``size`` pixels, as insightface's ``estimate_norm`` scales it."""
    if size % 112 == 0:
        return ARCFACE_DST * (size / 112.0)
    if size % 128 == 0:
        # insightface centres the 112 template in a 128 crop by shifting x by 8 (scaled).
        ratio = size / 128.0
        dst = ARCFACE_DST * ratio
        dst[:, 0] += 8.0 * ratio
        return dst
    raise ValueError(f"ArcFace crops must be a multiple of 112 or 128 pixels, got {size}")


def arcface_crop(img: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Align a face for ArcFace exactly as insightface's ``norm_crop`` does.

    Args:
        img: (H, W, 3) uint8 image (channel order is kept).
        landmarks: (5, 2) points: left eye, right eye, nose, left mouth, right mouth.
        size: crop side, 112 for the model zoo's recognition models.

    Returns:
        (size, size, 3) uint8 crop, black outside the source image.
    """
    # insightface fits the transform in float32 (its detector's landmarks and its template are
    # float32 and skimage keeps that precision); doing the same makes the crops identical, where a
    # float64 fit moves about one pixel value in a few thousand by one grey level.
    landmarks = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    if not np.all(np.isfinite(landmarks)):
        raise ValueError("landmarks contain NaN or infinity")
    return warp(img, umeyama(landmarks, _arcface_template32(size))[:2, :], size)


def _arcface_template32(size: int) -> np.ndarray:
    """:func:`arcface_template` computed as insightface's ``estimate_norm`` does, in float32."""
    arcface_template(size)  # validates the size
    ratio = size / 112.0 if size % 112 == 0 else size / 128.0
    dst = ARCFACE_DST.astype(np.float32) * ratio
    dst[:, 0] += 0.0 if size % 112 == 0 else 8.0 * ratio
    return dst


def ffhq_template(size: int = 512) -> np.ndarray:
    """facexlib's FFHQ 5-point template scaled to a ``size`` x ``size`` crop."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    return FFHQ_TEMPLATE_512 * (size / 512.0)


def ffhq_crop(img: np.ndarray, landmarks: np.ndarray, size: int = 512) -> np.ndarray:
    """FFHQ-style aligned crop of ``size`` pixels from 5 landmarks (facexlib's template and grey border).

    Args:
        img: (H, W, 3) uint8 image.
        landmarks: (5, 2) points in the insightface order.
        size: output side in pixels (512 for ReF-LDM / FFHQ-Ref).

    Returns:
        (size, size, 3) uint8 crop.
    """
    return warp(img, similarity_matrix(landmarks, ffhq_template(size)), size, FFHQ_BORDER_VALUE)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to (N, 2) points."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return points @ matrix[:, :2].T + matrix[:, 2]
