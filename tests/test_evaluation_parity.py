"""The refldm protocol's metrics equal pyiqa's (and clean-fid's) own code on images made here."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

from common.tiny_inception import tiny_inception  # noqa: E402

from refface.evaluation import fid, identity, imresize, iqa, niqe  # noqa: E402
from refface.evaluation.inception import FIDInceptionV3  # noqa: E402
from refface.evaluation.reference import ReferenceUnavailable, load_pyiqa  # noqa: E402
from refface.manifests.io import write_png  # noqa: E402

REL = 1e-4


@pytest.fixture(scope="module")
def pyiqa():
    try:
        return load_pyiqa()
    except ReferenceUnavailable as e:
        pytest.skip(str(e))


def textured(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour fields at several scales plus shapes: NIQE needs natural-ish statistics."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for scale in (4, 16, 64):
        noise = rng.normal(size=(scale, scale, 3)).astype(np.float32)
        img += cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC) * (40 / math.sqrt(scale))
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 4, (60, 30, 20), -1)
    return np.clip(img + 128, 0, 255).astype(np.uint8)


def degraded(img: np.ndarray, seed: int) -> np.ndarray:
    out = cv2.GaussianBlur(img, (0, 0), 1.5).astype(np.float32)
    out += np.random.default_rng(seed).normal(0, 8, img.shape)
    return np.clip(out, 0, 255).round().astype(np.uint8)


PAIRS = [(textured(200, 232, 1), 1), (textured(256, 256, 2), 2), (textured(97, 300, 3), 3)]


def test_luma_is_pyiqas_rounded_yiq(pyiqa):
    img = textured(64, 80, 5)
    theirs = pyiqa.color_util.to_y_channel(iqa.unit_float(img), 255, "yiq")[0, 0].double().numpy()
    np.testing.assert_array_equal(iqa.yiq_luma(img), theirs)


@pytest.mark.parametrize(
    "shape,scale", [((96, 96), 0.5), ((97, 131), 0.5), ((60, 45), 0.37), ((20, 33), 1.7)]
)
def test_imresize_matches_pyiqa_matlab_resize(pyiqa, shape, scale):
    x = np.random.default_rng(0).uniform(0, 1, size=shape)
    theirs = pyiqa.matlab_utils.imresize(torch.from_numpy(x)[None, None], scale=scale, antialiasing=True)
    # pyiqa builds its resize weights (and upscales) in float32; ours are MATLAB's float64 ones.
    np.testing.assert_allclose(imresize.imresize(x, scale), theirs[0, 0].numpy(), atol=5e-6)


@pytest.mark.parametrize("index", range(len(PAIRS)))
def test_psnr_ssim_equal_pyiqa(pyiqa, index):
    gt, seed = PAIRS[index]
    pred = degraded(gt, seed)
    x, y = iqa.unit_float(pred), iqa.unit_float(gt)
    assert iqa.psnr(pred, gt) == pytest.approx(float(pyiqa.psnr_arch.PSNR()(x, y)), rel=REL)
    assert iqa.ssim(pred, gt) == pytest.approx(float(pyiqa.ssim_arch.SSIM()(x, y)), rel=REL)
    assert iqa.psnr(gt, gt) == pytest.approx(80.0)  # pyiqa's eps: identical images are not inf


def _pyiqa_niqe(pyiqa, tmp_path):
    from scipy.io import savemat

    params = niqe.load_params()
    path = tmp_path / "niqe_modelparameters.mat"
    savemat(path, {"mu_prisparam": params["mu"][None], "cov_prisparam": params["cov"]})
    return pyiqa.niqe_arch.NIQE(pretrained_model_path=str(path))


@pytest.mark.parametrize("index", range(len(PAIRS)))
def test_niqe_equals_pyiqa(pyiqa, tmp_path, index):
    gt, seed = PAIRS[index]
    metric = _pyiqa_niqe(pyiqa, tmp_path)
    for img in (gt, degraded(gt, seed)):
        assert niqe.niqe(img) == pytest.approx(float(metric(iqa.unit_float(img))), rel=REL)


def test_niqe_rejects_images_smaller_than_a_block():
    with pytest.raises(ValueError, match="96x96"):
        niqe.niqe(textured(64, 200, 0))


@pytest.mark.faces
def test_niqe_ssim_psnr_on_a_shared_photo(pyiqa, tmp_path, faces_dir):
    from refface.evaluation.protocol import read_official

    path = sorted(p for p in faces_dir.rglob("*.jpg"))[0]
    gt = read_official(path)
    pred = degraded(gt, 0)
    x, y = iqa.unit_float(pred), iqa.unit_float(gt)
    assert niqe.niqe(pred) == pytest.approx(float(_pyiqa_niqe(pyiqa, tmp_path)(x)), rel=REL)
    assert iqa.ssim(pred, gt) == pytest.approx(float(pyiqa.ssim_arch.SSIM()(x, y)), rel=REL)


class PyiqaShaped(torch.nn.Module):
    """pyiqa calls Inception-named feature networks as ``model(x, resize, normalize)[0]``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, resize_input=False, normalize_input=False):
        assert not resize_input and not normalize_input
        return [self.net(x)[..., None, None]]


PyiqaShaped.__name__ = "TinyInceptionV3"


def test_fid_feature_path_equals_pyiqa_clean_mode(pyiqa, tmp_path):
    net = tiny_inception()
    folder = tmp_path / "restored"
    images = [degraded(textured(160 + 16 * (i % 3), 160, i), i) for i in range(6)]
    for i, img in enumerate(images):
        write_png(folder / f"{i:03d}.png", img)
    ours = fid.image_features(images, net)
    theirs = pyiqa.fid_arch.get_folder_features(
        str(folder), PyiqaShaped(net), num_workers=0, device=torch.device("cpu"), mode="clean", verbose=False
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    # Against a statistics file, as eval.py's fid(pred_dir, dataset_name='FFHQ', ...).
    ref = fid.image_features([textured(160, 160, 50 + i) for i in range(8)], net)
    mu, sigma = fid.statistics(ref)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    smu, ssigma = fid.load_statistics(tmp_path / "stats.npz")
    mine = fid.frechet_distance(*fid.statistics(ours), smu, ssigma)
    tmu, tsigma = np.mean(theirs, axis=0), np.cov(theirs, rowvar=False)
    assert mine == pytest.approx(pyiqa.fid_arch.frechet_distance(tmu, tsigma, mu, sigma), rel=REL)
    assert mine > 0


def test_clean_resize_equals_clean_fid():
    resize = pytest.importorskip("cleanfid.resize")
    img = textured(512, 512, 9)
    theirs = resize.make_resizer("PIL", False, "bicubic", (299, 299))(img)
    np.testing.assert_array_equal(fid.clean_resize(img), theirs)


def test_fid_inception_has_the_published_parameter_count():
    # torchvision's Inception3 (27,161,264 parameters) less its 1000-class fc and auxiliary head.
    model = FIDInceptionV3()
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 2_049_000 - 3_326_696
    assert model.dims == 2048


def test_ids_input_is_the_official_crop_and_area_resize():
    img = textured(512, 512, 4)
    x = identity.official_input(img)
    assert x.shape == (1, 3, 112, 112)
    crop = img[32:480, 32:480].astype(np.float64) / 255 * 2 - 1  # 448 = 4 x 112: area = 4x4 means
    expected = crop.reshape(112, 4, 112, 4, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    np.testing.assert_allclose(x[0].numpy(), expected, atol=1e-5)
