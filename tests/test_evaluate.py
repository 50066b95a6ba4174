"""``refface evaluate``: identical images score perfectly, degradation orders the metrics, missing weights are n/a."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from common.tiny_refldm import _one_thread  # noqa: F401  (autouse fixture)

from refface.evaluation.evaluate import evaluate_folders
from refface.evaluation.metrics import fit_niqe_params, frechet_distance
from refface.evaluation.models import EvalModels
from refface.evaluation.tables import markdown_table
from refface.evaluation.weights import EvalWeights
from refface.manifests.io import write_png
from refface.train.refldm.identity import iresnet
from refface.train.refldm.lpips import LPIPS

SIZE = 128


def face_like(seed: int) -> np.ndarray:
    """A smooth image with edges and texture at several scales (enough structure for every metric)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((SIZE, SIZE, 3), np.float32)
    for scale in (4, 16, 64):
        noise = rng.normal(size=(scale, scale, 3)).astype(np.float32)
        img += cv2.resize(noise, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC) * (40 / math.sqrt(scale))
    cv2.circle(img, (64, 60), 30, (60, 30, 20), -1)
    cv2.rectangle(img, (40, 90), (88, 100), (-50, -40, -40), -1)
    return np.clip(img + 128, 0, 255).astype(np.uint8)


def degrade(img: np.ndarray, sigma: float, noise: float, seed: int) -> np.ndarray:
    out = cv2.GaussianBlur(img, (0, 0), sigma) if sigma > 0 else img.astype(np.float32)
    out = out.astype(np.float32) + np.random.default_rng(seed).normal(0, noise, img.shape)
    return np.clip(out, 0, 255).round().astype(np.uint8)


class TinyFeatures(torch.nn.Module):
    """A random stand-in for the FID Inception: (B, 3, H, W) in [-1, 1] -> (B, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, 2), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, 2)
        )

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    gts = [face_like(i) for i in range(6)]
    return EvalModels(
        arcface=iresnet("r18", widths=(4, 8, 8, 8)).eval(),
        lpips=LPIPS(widths=(4, 8, 8, 8, 8)).eval(),
        feature_net=TinyFeatures().eval(),
        niqe_params=fit_niqe_params(gts),
    )


@pytest.fixture()
def folders(tmp_path):
    gt = tmp_path / "gt"
    for i in range(6):
        write_png(gt / f"{i:05d}.png", face_like(i))
    return tmp_path, gt


def write_set(root, name, fn):
    folder = root / name
    for i in range(6):
        write_png(folder / f"{i:05d}.png", fn(i))
    return folder


def test_identical_images_score_perfectly(folders, models):
    root, gt = folders
    same = write_set(root, "same", face_like)
    r = evaluate_folders(same, gt, models=models, out=root / "eval")
    assert r.metrics["psnr"] == math.inf
    assert r.metrics["ssim"] == pytest.approx(1.0)
    assert r.metrics["lpips"] == 0.0 and r.metrics["lpips_box"] == 0.0
    assert r.metrics["ids"] == pytest.approx(1.0, abs=1e-6)
    assert r.metrics["fid"] == pytest.approx(0.0, abs=1e-3)
    assert not r.unavailable and len(r.per_image) == 6
    md = (root / "eval" / "metrics.md").read_text()
    assert "| Method | IDS↑ | LPIPS↓ | LPIPS-box↓ | NIQE↓ | FID↓ | PSNR↑ | SSIM↑ |" in md
    assert "| same | 1.000 | 0.000 | 0.000 |" in md and "| inf | 1.000 |" in md
    assert (root / "eval" / "metrics.csv").read_text().startswith("method,protocol,images,ids,lpips")


def test_degradation_orders_the_metrics(folders, models):
    root, gt = folders
    mild = evaluate_folders(
        write_set(root, "mild", lambda i: degrade(face_like(i), 0.0, 3, i)), gt, models=models
    )
    heavy = evaluate_folders(
        write_set(root, "heavy", lambda i: degrade(face_like(i), 3.0, 25, i)), gt, models=models
    )
    m, h = mild.metrics, heavy.metrics
    assert m["psnr"] > h["psnr"] and m["ssim"] > h["ssim"]
    assert 0 < m["lpips"] < h["lpips"] and 0 < m["lpips_box"] < h["lpips_box"]
    assert m["niqe"] < h["niqe"]
    assert m["fid"] < h["fid"]
    assert h["ids"] < 1.0
    table = markdown_table([mild, heavy])
    assert table.index("| mild |") < table.index("| heavy |")


def test_missing_weights_are_reported_unavailable(folders, tmp_path):
    root, gt = folders
    noisy = write_set(root, "noisy", lambda i: degrade(face_like(i), 1.0, 5, i))
    r = evaluate_folders(noisy, gt, weights=EvalWeights.from_dir(tmp_path / "no_weights"), out=root / "e")
    assert set(r.unavailable) == {"ids", "lpips", "lpips_box", "niqe", "fid"}
    assert "w600k_r50.onnx" in r.unavailable["ids"] and "vgg16-397923af.pth" in r.unavailable["lpips"]
    assert "inception-2015-12-05.pt" in r.unavailable["fid"]
    assert math.isnan(r.metrics["ids"]) and 10 < r.metrics["psnr"] < 60
    assert "n/a" in (root / "e" / "metrics.md").read_text()


def test_bad_and_unmatched_images_become_error_rows(folders, models):
    root, gt = folders
    rest = write_set(root, "rest", face_like)
    (rest / "00001.png").write_bytes(b"not a png")
    write_png(rest / "extra.png", face_like(9))
    r = evaluate_folders(rest, gt, models=models, out=root / "e2")
    assert len(r.per_image) == 5
    reasons = r.errors.to_frame()
    assert len(reasons) == 2 and set(reasons["stage"]) == {"evaluate"}
    assert "extra" in set(reasons["path"]) and "no GT" in " ".join(reasons["reason"])


def test_refs_csv_restricts_the_scored_targets(folders, models, tmp_path):
    root, gt = folders
    rest = write_set(root, "rest", face_like)
    csv = tmp_path / "refs.csv"
    csv.write_text("gt_image,ref_image\n00002.png,\"['00003.png']\"\n00004.png,\"['00001.png']\"\n")
    r = evaluate_folders(rest, gt, refs_csv=csv, models=models)
    assert sorted(row["key"] for row in r.per_image) == ["00002", "00004"]


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) + np.array([2.0, 0.0, 0.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)


def test_lpips_loads_torchvision_and_lpips_files(tmp_path):
    from refface.train.refldm.lpips import VGG16Features

    torch.manual_seed(0)
    vgg = VGG16Features()
    torch.save({**vgg.state_dict(), "classifier.0.weight": torch.zeros(1)}, tmp_path / "vgg16.pth")
    head = {
        f"lin{i}.model.1.weight": torch.full((1, w, 1, 1), 0.01)
        for i, w in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(head, tmp_path / "vgg.pth")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        LPIPS.from_files(tmp_path / "nothere.pth", tmp_path / "vgg.pth")
    model = LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    assert torch.equal(model.net.features[0].weight, vgg.features[0].weight)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(model(x, x)[0]) == 0.0 and float(model(x, -x)[0]) > 0


def test_cli_prints_and_writes_the_table(folders, tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    root, gt = folders
    noisy = write_set(root, "noisy", lambda i: degrade(face_like(i), 1.0, 5, i))
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--restored",
            str(noisy),
            "--gt",
            str(gt),
            "--weights",
            str(tmp_path / "none"),
            "--out",
            str(root / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert (root / "o" / "metrics.md").is_file() and (root / "o" / "per_image.csv").is_file()
    res = CliRunner().invoke(app, ["evaluate", "--restored", str(root / "absent"), "--gt", str(gt)])
    assert res.exit_code == 2


# ----------------------------------------------------------------------------------------------------
# the refldm protocol (ReF-LDM scripts/eval.py)


@pytest.fixture(scope="module")
def refldm_models():
    from common.tiny_inception import tiny_inception

    from refface.evaluation import niqe

    torch.manual_seed(0)
    return EvalModels(
        arcface=iresnet("r18", widths=(4, 8, 8, 8)).eval(),
        lpips=LPIPS(widths=(4, 8, 8, 8, 8)).eval(),
        feature_net=tiny_inception(),
        niqe_params=niqe.load_params(),
    )


def big(i: int) -> np.ndarray:
    return cv2.resize(face_like(i), (512, 512), interpolation=cv2.INTER_CUBIC)


def test_refldm_pairs_flat_png_names_and_resizes_both_to_512(tmp_path, refldm_models):
    gt, rest = tmp_path / "gt", tmp_path / "rest"
    for i in range(4):
        write_png(gt / f"{i:05d}.png", big(i))
        write_png(rest / f"{i:05d}.png", big(i) if i < 3 else cv2.resize(big(i), (256, 256)))
    write_png(rest / "nested" / "00001.png", big(1))  # eval.py globs the folder itself only
    write_png(rest / "99999.png", big(9))  # no GT: an error row, where eval.py would assert
    r = evaluate_folders(rest, gt, models=refldm_models, protocol="refldm", out=tmp_path / "e")
    by_key = {row["key"]: row for row in r.per_image}
    assert sorted(by_key) == ["00000", "00001", "00002", "00003"]
    assert by_key["00000"]["psnr"] == pytest.approx(80.0)  # pyiqa's eps, not inf
    assert by_key["00000"]["ssim"] == pytest.approx(1.0) and by_key["00000"]["ids"] == pytest.approx(1.0)
    assert 20 < by_key["00003"]["psnr"] < 80  # the 256 px file was resized to 512, not rejected
    assert list(r.errors.to_frame()["path"]) == ["99999"]
    assert r.protocol == "refldm" and r.metrics["fid"] == pytest.approx(0.0, abs=0.05)
    md = (tmp_path / "e" / "metrics.md").read_text()
    assert "| Method | IDS↑ | LPIPS↓ | fLPIPS↓ | NIQE↓ | MUSIQ↑ | FID↓ | PSNR↑ | SSIM↑ |" in md
    assert "protocol: refldm" in md and "FID against the GT set" in md


def test_refldm_flpips_masks_both_images_with_the_parsing_labels(tmp_path, refldm_models):
    from dataclasses import replace

    from refface.evaluation.parsing import LabelMaps

    gt, rest, labels = tmp_path / "gt", tmp_path / "rest", tmp_path / "labels"
    labels.mkdir()
    face = np.zeros((512, 512), np.uint8)
    face[128:448, 160:352] = 2  # skin
    face[:64] = 14  # hair: outside the fLPIPS mask
    for i in range(3):
        target = big(i)
        changed = target.copy()
        changed[face == 0] = 255 - changed[face == 0]  # edits outside the face only
        write_png(gt / f"{i:05d}.png", target)
        write_png(rest / f"{i:05d}.png", changed)
        np.save(labels / f"{i:05d}.npy", face)
    models = replace(refldm_models, parser=LabelMaps(labels))
    r = evaluate_folders(rest, gt, models=models, protocol="refldm")
    assert r.metrics["flpips"] == pytest.approx(0.0, abs=1e-6) and r.metrics["lpips"] > 0.01


# Inception features of every image at 299 px (~6 s).
@pytest.mark.slow
def test_refldm_fid_against_a_statistics_file(tmp_path, refldm_models):
    from dataclasses import replace

    from refface.evaluation import fid

    gt = tmp_path / "gt"
    for i in range(6):
        write_png(gt / f"{i:05d}.png", big(i))
    stats = fid.statistics(fid.image_features([big(i) for i in range(6)], refldm_models.feature_net))
    models = replace(refldm_models, fid_stats=stats, fid_reference="reference statistics s.npz")
    same = evaluate_folders(gt, gt, models=models, protocol="refldm")
    blurred = write_set(tmp_path, "blur", lambda i: cv2.GaussianBlur(big(i), (0, 0), 4))
    worse = evaluate_folders(blurred, gt, models=models, protocol="refldm")
    # The tiny network's features are small, so are its distances: compare orders of magnitude.
    assert abs(same.metrics["fid"]) < 1e-6 and worse.metrics["fid"] > 1e-4
    assert "FID against reference statistics s.npz" in markdown_table([same])


def test_refldm_missing_files_name_what_to_place(tmp_path):
    gt = tmp_path / "gt"
    for i in range(3):
        write_png(gt / f"{i:05d}.png", big(i))
    weights = EvalWeights.from_dir(tmp_path / "none", "refldm")
    r = evaluate_folders(gt, gt, weights=weights, protocol="refldm")
    why = r.unavailable
    assert set(why) == {"ids", "lpips", "flpips", "musiq", "fid"}
    assert "insightface_webface_r50.onnx" in why["ids"] and "musiq_koniq_ckpt-e95806b9.pth" in why["musiq"]
    assert "pt_inception-2015-12-05-6726825d.pth" in why["fid"] and "face-parsing" in why["flpips"]
    assert r.metrics["niqe"] > 0  # the shipped pristine model needs no file
    stats_only = EvalWeights.from_dir(tmp_path / "none", "refldm", inception=str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="stats.*gt"):
        evaluate_folders(gt, gt, weights=stats_only, protocol="refldm", fid_reference="both")
