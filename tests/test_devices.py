"""Devices: no silent CPU fallback on a GPU machine, what stage manifests record, `refface doctor`."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from common.tiny_arcface import build_tiny_arcface

from refface import devices


@pytest.fixture
def gpu_without_ort_cuda(monkeypatch):
    """A machine with an NVIDIA GPU whose onnxruntime has only the CPU provider."""
    import onnxruntime as ort

    monkeypatch.setattr(devices, "nvidia_gpus", lambda: ("GPU 0: NVIDIA H100 80GB HBM3",))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.delenv(devices.ALLOW_CPU_ENV, raising=False)


def test_onnx_refuses_to_run_silently_on_the_cpu_when_a_gpu_is_present(gpu_without_ort_cuda):
    from refface.mining.detect import onnx_providers

    with pytest.raises(devices.CpuFallbackError) as err:
        onnx_providers()
    message = str(err.value)
    assert "CUDAExecutionProvider" in message
    assert "pip install 'onnxruntime-gpu[cuda,cudnn]'" in message and "make install GPU=1" in message
    assert devices.ALLOW_CPU_ENV in message


def test_arcface_embedder_refuses_too(gpu_without_ort_cuda, tmp_path):
    from refface.mining.embed import ArcFaceEmbedder

    with pytest.raises(devices.CpuFallbackError, match="would run on the CPU"):
        ArcFaceEmbedder(build_tiny_arcface(tmp_path / "w600k_r50.onnx"))


def test_mining_checks_before_any_worker_starts(gpu_without_ort_cuda):
    from refface.mining.pipeline import MiningConfig, model_devices

    with pytest.raises(devices.CpuFallbackError):
        model_devices(MiningConfig(detector="scrfd", embedder="arcface"))
    # dlib runs on the CPU by design: nothing to refuse.
    assert model_devices(MiningConfig(detector="dlib", embedder="dlib")) == {
        "detector": "cpu (dlib)",
        "embedder": "cpu (dlib)",
    }


def test_allowing_the_cpu_turns_the_refusal_into_a_warning(gpu_without_ort_cuda, monkeypatch, caplog):
    from refface.mining.detect import onnx_providers

    monkeypatch.setenv(devices.ALLOW_CPU_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="refface.devices"):
        assert onnx_providers() == ["CPUExecutionProvider"]
    assert "onnxruntime-gpu" in caplog.text


def test_both_ort_builds_installed_is_named_as_the_cause(monkeypatch):
    monkeypatch.setattr(
        devices, "installed_versions", lambda names: {n: "1.31.1" for n in names if n.startswith("onnx")}
    )
    assert "both onnxruntime builds are installed" in devices.ort_diagnosis(["CPUExecutionProvider"])


def test_no_gpu_means_no_refusal(monkeypatch):
    import onnxruntime as ort

    from refface.mining.detect import onnx_providers

    monkeypatch.setattr(devices, "nvidia_gpus", lambda: ())
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers() == ["CPUExecutionProvider"]


def test_stage_manifest_records_the_devices_used(tmp_path):
    from refface.mining.embed import ArcFaceEmbedder
    from refface.stages import run_stage

    embedder = ArcFaceEmbedder(build_tiny_arcface(tmp_path / "w600k_r50.onnx"))

    def work():
        (tmp_path / "out.txt").write_text("x")
        return {"outputs": ["out.txt"], "devices": {"embedder": embedder.session.get_providers()}}

    manifest, ran = run_stage(tmp_path, "probe", {}, {}, work)
    on_disk = json.loads((tmp_path / ".stages" / "probe.json").read_text())
    assert ran and on_disk["devices"] == manifest["devices"]
    assert on_disk["devices"]["embedder"] == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in on_disk["devices"]["onnxruntime"]["providers"]
    assert on_disk["devices"]["used"]["onnxruntime:w600k_r50.onnx"] == ["CPUExecutionProvider"]
    assert "gpus" in on_disk["devices"]


# ------------------------------------------------------------------------------------------ doctor


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_doctor_finds_weights_and_checks_published_digests(tmp_path, monkeypatch):
    from refface import doctor

    root = tmp_path / "insightface"
    root.mkdir()
    (root / "det_10g.onnx").write_bytes(b"not the published detector")
    build_tiny_arcface(root / "w600k_r50.onnx")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "inception-2015-12-05.pt").write_bytes(b"inception")
    data = b"a head whose digest we publish"
    (weights / "lpips_vgg_v0.1.pth").write_bytes(data)
    monkeypatch.setitem(
        doctor.KNOWN_DIGESTS, "lpips_vgg_v0.1.pth", ("sha256", _sha256(data), "a published head")
    )
    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    monkeypatch.setattr(devices, "nvidia_gpus", lambda: ())

    report = doctor.collect(model_root=root, weights_dir=weights, sd=sd)
    by_name = {c.name: c for c in report.weights}
    assert by_name["SCRFD det_10g.onnx"].status == "differs"
    assert by_name["ArcFace"].status == "differs" and by_name["ArcFace"].path.endswith("w600k_r50.onnx")
    assert by_name["LPIPS v0.1 head [lpips_vgg_v0.1.pth]"].status == "ok"
    inception = by_name["FID Inception [inception-2015-12-05.pt]"]
    assert inception.status == "found" and inception.digest == "sha256:" + _sha256(b"inception")
    backbone = by_name["LPIPS VGG16 backbone [vgg16-397923af.pth]"]
    assert backbone.status == "missing" and str(weights / "vgg16-397923af.pth") in backbone.looked_at
    assert by_name["Stable Diffusion folder"].status == "incomplete"
    assert "model_index.json" in by_name["Stable Diffusion folder"].note
    assert any("det_10g.onnx" in w and "differs" in w for w in report.warnings)
    assert not any("GPU present" in w for w in report.warnings)


def test_doctor_warns_when_a_gpu_would_go_unused(gpu_without_ort_cuda, tmp_path):
    from refface import doctor

    report = doctor.collect(model_root=tmp_path, weights_dir=tmp_path, verify=False)
    assert report.gpus == ["GPU 0: NVIDIA H100 80GB HBM3"]
    ort_warning = next(w for w in report.warnings if "onnxruntime has no CUDAExecutionProvider" in w)
    assert "make install GPU=1" in ort_warning
    if report.faiss["installed"] and report.faiss["gpus"] == 0:
        assert any("FAISS sees none" in w for w in report.warnings)
    if report.torch["installed"] and not report.torch["cuda_devices"]:
        assert any("training runs on the CPU" in w for w in report.warnings)


def test_doctor_command_prints_and_writes_json(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from refface.cli import app

    monkeypatch.setattr(devices, "nvidia_gpus", lambda: ())
    out = tmp_path / "doctor.json"
    result = CliRunner().invoke(
        app, ["doctor", "--model-root", str(tmp_path), "--no-verify", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "refface doctor: compute" in result.output and "refface doctor: weights" in result.output
    report = json.loads(out.read_text())
    assert {"gpus", "torch", "onnxruntime", "faiss", "weights", "warnings"} <= set(report)
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    strict = CliRunner().invoke(app, ["doctor", "--model-root", str(tmp_path), "--no-verify", "--strict"])
    assert strict.exit_code == (1 if report["warnings"] else 0)
