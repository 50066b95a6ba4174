"""Degrader behaviour: determinism, presets, bad input by rule, goldens, the torch path and ``refface degrade``."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from refface.degradations import PRESETS, Degrader, get_preset, list_presets, load_presets_file, ops
from refface.degradations.kernels import bivariate_gaussian
from refface.manifests.errors import ImageError

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "tests" / "data" / "degradations"


def _img(seed: int = 0, size: int = 96, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (12, 12, channels), dtype=np.uint8), (size, size))
    return np.clip(base.astype(int) + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


SMALL = get_preset("refldm-moderate", out_size=96, downsample_range=(1.5, 6.0))


def test_presets_listed_and_named_as_refldm():
    names = list_presets()
    for name in (
        "refldm-train",
        "refldm-moderate",
        "refldm-severe",
        "gfpgan-train",
        "codeformer-stage2",
        "codeformer-stage3-small",
        "codeformer-stage3-large",
        "difface-test",
    ):
        assert name in names
    assert PRESETS["refldm-severe"].set_name == "severe_b8-16_r8-32_n0-20_j30-100"
    assert PRESETS["refldm-moderate"].set_name == "moderate_b0-8_r1-8_n0-15_j60-100"
    assert get_preset("refldm-severe", noise_range=[0, 5]).noise_range == (0, 5)
    with pytest.raises(ValueError, match="unknown degradation preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="jpeg_range"):
        get_preset("refldm-severe", jpeg_range=(50, 120))
    with pytest.raises(ValueError, match="unknown preset fields"):
        get_preset("refldm-severe", blur=(1, 2))


def test_custom_presets_from_yaml(tmp_path):
    loaded = load_presets_file(REPO / "configs" / "degradations" / "example.yaml", register=False)
    noisy = loaded["severe-noisy"]
    assert noisy.noise_range == (10, 30) and noisy.downsample_range == (8, 32)
    assert noisy.set_name == "severenoisy_b8-16_r8-32_n10-30_j30-100"
    mixed = loaded["realesrgan-like-first-order"]
    kinds = {Degrader(mixed).sample(f"k{i}")["noise_type"] for i in range(40)}
    assert kinds == {"gaussian", "poisson"}
    lq, params = Degrader(mixed).degrade(_img(size=64), "a")
    assert lq.shape == (512, 512, 3) and params["kernel_size"] == 21
    bad = tmp_path / "bad.yaml"
    bad.write_text("presets:\n  x:\n    base: missing\n")
    with pytest.raises(ValueError, match="unknown base"):
        load_presets_file(bad, register=False)


def test_deterministic_per_key_whatever_the_order():
    img_a, img_b = _img(1), _img(2)
    d = Degrader(SMALL, seed=3)
    first = [d.degrade(img_a, "a"), d.degrade(img_b, "b")]
    second = [Degrader(SMALL, seed=3).degrade(img_b, "b"), Degrader(SMALL, seed=3).degrade(img_a, "a")][::-1]
    for (lq1, p1), (lq2, p2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(lq1, lq2)
        assert p1 == p2
    assert first[0][1]["scale"] != first[1][1]["scale"]
    assert Degrader(SMALL, seed=4).sample("a") != d.sample("a")
    # Other presets draw independently for the same key.
    assert (
        Degrader("refldm-severe", seed=3).sample("a")["sigma_x"]
        != Degrader("refldm-train", seed=3).sample("a")["sigma_x"]
    )


def test_params_record_every_draw_and_are_json():
    lq, params = Degrader("gfpgan-train", seed=0).degrade(_img(size=64), "x")
    assert lq.shape == (512, 512, 3) and lq.dtype == np.uint8
    for field in ("kernel_type", "sigma_x", "sigma_y", "theta", "beta", "scale", "noise_type", "noise_sigma"):
        assert field in params
    for field in (
        "noise_gray",
        "jpeg_quality",
        "color_jitter",
        "gray",
        "noise_seed",
        "lq_width",
        "lq_height",
    ):
        assert field in params
    assert params["lq_width"] == int(512 // params["scale"])
    json.loads(json.dumps(params))
    assert "resized from 64x64" in params["input_notes"]


def test_gfpgan_jitter_and_gray_happen_at_their_rates():
    d = Degrader("gfpgan-train", seed=0)
    draws = [d.sample(f"{i}") for i in range(4000)]
    jitter = np.mean([p["color_jitter"] is not None for p in draws])
    gray = np.mean([p["gray"] for p in draws])
    assert abs(jitter - 0.3) < 0.03 and 0.002 < gray < 0.025
    key = next(p["key"] for p in draws if p["gray"])
    lq, _ = d.degrade(_img(size=64), key)
    assert np.array_equal(lq[..., 0], lq[..., 1]) and np.array_equal(lq[..., 1], lq[..., 2])


def test_bad_input_by_rule():
    d = Degrader(SMALL, seed=0)
    rgb = _img(5)
    gray = rgb[..., 0]
    lq_gray, p = d.degrade(gray, "g")
    assert lq_gray.shape == (96, 96, 3) and "gray" in p["input_notes"]
    np.testing.assert_array_equal(d.degrade(gray[..., None], "g")[0], lq_gray)
    rgba = np.concatenate([rgb, np.full((96, 96, 1), 255, np.uint8)], axis=2)
    lq_rgba, p = d.degrade(rgba, "c")
    np.testing.assert_array_equal(lq_rgba, d.degrade(rgb, "c")[0])  # opaque alpha changes nothing
    assert "alpha" in p["input_notes"]
    transparent = rgba.copy()
    transparent[..., 3] = 0
    prepared, _ = __import__("refface.degradations", fromlist=["prepare_input"]).prepare_input(
        transparent, SMALL
    )
    assert (prepared == 255).all()
    wide = rgb.astype(np.uint16) * 257
    lq16, p = d.degrade(wide, "c")
    np.testing.assert_array_equal(lq16, d.degrade(rgb, "c")[0])
    assert "16-bit" in p["input_notes"]
    with pytest.raises(ImageError, match="smaller than the largest downsample factor"):
        Degrader("refldm-severe").degrade(_img(size=20), "tiny")
    # Without out_size the image keeps its size; the LQ side never drops below one pixel.
    native = get_preset("refldm-severe", out_size=None)
    lq, p = Degrader(native).degrade(_img(size=70)[:40], "n")
    assert lq.shape == (40, 70, 3) and p["lq_height"] >= 1 and p["lq_width"] == max(1, int(70 // p["scale"]))
    with pytest.raises(ImageError, match="pixel type"):
        d.degrade(rgb.astype(np.float32), "f")
    with pytest.raises(ImageError, match="shape"):
        d.degrade(np.zeros((8, 8, 5), np.uint8), "five")


@pytest.mark.parametrize(
    ("shape", "size", "sigma"),
    [
        ((96, 96), (12, 12), (3.0, 1.0, 0.7)),
        ((70, 101), (60, 40), (6.0, 2.0, 2.1)),
        ((64, 64), (80, 80), (1.0, 1.0, 0.0)),
    ],
)
def test_fused_blur_downsample_matches_opencv(shape, size, sigma):
    """Non-square, odd sizes and upsampling (r < 1, as gfpgan-train draws) stay within the bound."""
    img = _img(9, size=max(shape))[: shape[0], : shape[1]]
    kernel = bivariate_gaussian(41, sigma[0], sigma[1], sigma[2], isotropic=False)
    fused = ops.blur_downsample(img, kernel, size)
    reference = ops.reference_blur_downsample(img, kernel, size)
    assert fused.shape == reference.shape == (size[1], size[0], 3)
    assert np.abs(fused - reference).max() * 255 <= ops.DEFAULT_TOLERANCE


@pytest.mark.parametrize("route", ops.BLUR_ROUTES)
@pytest.mark.parametrize(
    ("shape", "size", "sigma"),
    [
        ((96, 96), (40, 40), (4.0, 0.6, 0.9)),  # thin rotated: many separable pieces
        ((70, 101), (60, 40), (1.2, 1.2, 0.0)),  # small isotropic: one short piece
        ((64, 64), (80, 80), (2.5, 1.0, 2.0)),  # upsampling (r < 1)
    ],
)
def test_every_blur_route_matches_opencv(route, shape, size, sigma):
    """Fused products, whole-image separable passes and the DFT all stay within the bound."""
    img = _img(11, size=max(shape))[: shape[0], : shape[1]]
    kernel = bivariate_gaussian(41, sigma[0], sigma[1], sigma[2], isotropic=False)
    ours = ops.blur_downsample(img, kernel, size, route=route)
    reference = ops.reference_blur_downsample(img, kernel, size)
    assert ours.shape == reference.shape == (size[1], size[0], 3)
    assert ours.dtype == np.float32
    assert np.abs(ours - reference).max() * 255 <= ops.DEFAULT_TOLERANCE


def test_blur_route_choice_depends_on_shapes_only():
    """The cost model picks the cheap route for each regime, from shapes alone (no timing)."""
    shape = (512, 512, 3)

    def route(sigma_x, sigma_y, theta, scale):
        kernel = bivariate_gaussian(41, sigma_x, sigma_y, theta, isotropic=False)
        p, _, _ = ops.separable_pieces(kernel, ops.DEFAULT_TOLERANCE / 255.0)
        return ops.choose_route(shape, ops.lq_size(512, 512, scale), *p.shape)

    assert route(0.8, 0.8, 0.0, 2.0) == "separable"  # one short piece: whole-image passes are cheapest
    assert route(6.0, 6.0, 0.0, 6.0) == "fused"  # large r: blur only the rows and columns read
    assert route(5.4, 4.0, 0.3, 1.3) == "fft"  # many long pieces at small r: one DFT blur
    assert [route(5.4, 4.0, 0.3, 1.3) for _ in range(3)] == ["fft"] * 3
    with pytest.raises(ValueError, match="unknown blur route"):
        ops.blur_downsample(_img(), bivariate_gaussian(41, 1.0, 1.0, 0.0), (40, 40), route="direct")


def test_linear_taps_reproduce_cv2_resize():
    rng = np.random.default_rng(0)
    for n_in, n_out in ((512, 64), (512, 17), (37, 100), (512, 512), (10, 3)):
        src = rng.random((4, n_in)).astype(np.float32)
        s0, s1, w1 = ops.linear_taps(n_in, n_out)
        ours = src[:, s0] * (1 - w1) + src[:, s1] * w1
        theirs = cv2.resize(src, (n_out, 4), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_goldens():
    """Small stored outputs (regenerate with tests/data/degradations/regenerate.py)."""
    from refface.manifests.io import read_image

    spec = json.loads((GOLDEN_DIR / "goldens.json").read_text())
    for case in spec["cases"]:
        img = read_image(GOLDEN_DIR / spec["input"])
        cfg = get_preset(case["preset"], **case["overrides"])
        lq, params = Degrader(cfg, seed=case["seed"]).degrade(img, case["key"])
        assert json.loads(json.dumps(params)) == case["params"]
        golden = read_image(GOLDEN_DIR / case["output"])
        # Same parameters and noise; pixels may differ by a JPEG-boundary level across BLAS builds.
        assert ops.psnr(lq, golden) >= 45.0


@pytest.mark.parametrize("blur", ["fused", "fft"])
def test_torch_batch_matches_cpu_path(blur):
    import torch

    from refface.degradations.torch_ops import degrade_batch

    cfg = get_preset("refldm-moderate", out_size=96, downsample_range=(1.5, 6.0))
    imgs = [_img(s) for s in range(3)]
    keys = ["a", "b", "c"]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    lq, params = degrade_batch(x, keys, cfg, seed=2, blur=blur)
    assert lq.shape == x.shape and lq.dtype == torch.float32
    assert float(lq.min()) >= 0 and float(lq.max()) <= 1
    d = Degrader(cfg, seed=2)
    for i, key in enumerate(keys):
        cpu, cpu_params = d.degrade(imgs[i], key)
        assert (
            params[i]["sigma_x"] == cpu_params["sigma_x"]
            and params[i]["noise_seed"] == cpu_params["noise_seed"]
        )
        ours = (lq[i] * 255).round().byte().permute(1, 2, 0).numpy()
        assert ops.psnr(ours, cpu) >= 40.0


# ----------------------------------------------------------------------------- refface degrade
def _folder(tmp_path: Path, n: int = 5) -> Path:
    from refface.manifests.io import write_png

    root = tmp_path / "faces"
    for i in range(n):
        write_png(root / "sub" / f"{i:03d}.png", _img(i, size=48))
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


def _run(args: list[str]):
    from typer.testing import CliRunner

    from refface.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_degrade_folder_twice_and_resume(tmp_path):
    from refface.builders.degrade_sets import degrade_folder

    root = _folder(tmp_path)
    out = tmp_path / "lq"
    summary = degrade_folder(root, out, presets=["refldm-moderate"], workers=1, seed=0)
    (s,) = summary["sets"]
    set_dir = out / "moderate_b0-8_r1-8_n0-15_j60-100"
    assert s["ran"] and s["written"] == 5 and s["errors"] == 1
    assert sorted(p.name for p in (set_dir / "sub").glob("*.png")) == [f"{i:03d}.png" for i in range(5)]
    assert Image_size(set_dir / "sub" / "000.png") == (512, 512)
    params = pd.read_parquet(set_dir / "params.parquet")
    assert list(params["gt_image"]) == [f"sub/{i:03d}.png" for i in range(5)]
    assert pd.read_csv(set_dir / "errors.csv")["path"].tolist() == ["broken.jpg"]
    before = _snapshot(set_dir)
    table_before = (set_dir / "params.parquet").read_bytes()

    again = degrade_folder(root, out, presets=["refldm-moderate"], workers=1, seed=0)
    assert not again["sets"][0]["ran"]

    # A killed run: no manifest, some outputs missing, a half-written temp file left behind.
    (set_dir / "manifest.json").unlink()
    (set_dir / "params.parquet").unlink()
    for name in ("sub/001.png", "sub/003.png"):
        (set_dir / name).unlink()
    # Resumed with two worker processes and smaller chunks: same bytes whatever the split.
    resumed = degrade_folder(root, out, presets=["refldm-moderate"], workers=2, seed=0, chunk_size=2)
    assert resumed["sets"][0]["ran"] and resumed["sets"][0]["written"] == 2
    assert _snapshot(set_dir) == before
    assert (set_dir / "params.parquet").read_bytes() == table_before

    # Another seed into the same folder would mix two sets: refused.
    with pytest.raises(ValueError, match="another recipe"):
        degrade_folder(root, out, presets=["refldm-moderate"], workers=1, seed=1)


def Image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_degrade_dataset_root_fills_lq_column(tmp_path):
    images = _folder(tmp_path)
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "build.json").write_text(json.dumps({"image_root": str(images)}))
    refs = pd.DataFrame(
        {
            "gt_image": ["sub/000.png", "sub/002.png", "broken.jpg"],
            "lq_image": ["", "", ""],
            "ref_image": ["['sub/001.png']", "['sub/003.png', 'sub/004.png']", "['sub/000.png']"],
        }
    )
    refs.to_csv(root / "test_references.csv", index=False)
    refs.iloc[:1].drop(columns=["lq_image"]).to_csv(root / "val_references.csv", index=False)
    result = _run(["degrade", str(root), "--preset", "refldm-severe", "--preset", "refldm-moderate"])
    assert "severe_b8-16_r8-32_n0-20_j30-100" in result.output
    test = pd.read_csv(root / "test_references.csv", dtype=str, keep_default_na=False)
    # Flat unique names: ReF-LDM's inference names its result after the LQ file's stem.
    assert test["lq_image"].tolist() == ["000.png", "002.png", ""]
    assert test["ref_image"].tolist() == refs["ref_image"].tolist()
    val = pd.read_csv(root / "val_references.csv", dtype=str, keep_default_na=False)
    assert list(val.columns) == ["gt_image", "lq_image", "ref_image"] and val["lq_image"][0] == "000.png"
    for set_name in ("severe_b8-16_r8-32_n0-20_j30-100", "moderate_b0-8_r1-8_n0-15_j60-100"):
        assert (root / "lq" / set_name / "002.png").exists()
        assert not (root / "lq" / set_name / "001.png").exists()  # references are not targets
    listed = _run(["degrade", "--list"])
    assert "refldm-severe" in listed.output


def test_degrade_dataset_without_image_root_needs_images(tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    root = tmp_path / "dataset"
    root.mkdir()
    pd.DataFrame({"gt_image": ["a.png"], "lq_image": [""], "ref_image": ["[]"]}).to_csv(
        root / "test_references.csv", index=False
    )
    result = CliRunner().invoke(app, ["degrade", str(root)])
    assert result.exit_code == 2 and "--images" in result.output
