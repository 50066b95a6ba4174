"""``refface doctor``: what this install can run on and which model weights it can find.

Reports GPUs, the torch build and its CUDA devices, onnxruntime's providers, FAISS's GPUs, and each
weights file refface reads (ArcFace, SCRFD, LPIPS, FID Inception, NIQE, deepface, a Stable
Diffusion folder): where it was looked for, whether it was found, and whether its digest matches
the published file. Warns when a GPU is present but a stage would run on the CPU.

:func:`collect` builds the report (a plain dict, also written by ``--json``); :func:`render` prints it.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from refface import devices
from refface.evaluation.weights import DEFAULT_WEIGHT_FILES
from refface.mining.attributes import DEEPFACE_WEIGHT_FILES
from refface.mining.detect import default_model_root, face_recognition_models_dir
from refface.mining.embed import ARCFACE_FILES
from refface.mining.neighbors import load_faiss

# Published digests of the weights files refface reads: (algorithm, digest, where it is published).
# "sha256-prefix" is the 8-hex-digit sha256 prefix torch hub puts in the file name.
KNOWN_DIGESTS: dict[str, tuple[str, str, str]] = {
    "w600k_r50.onnx": (
        "sha256",
        "4c06341c33c2ca1f86781dab0e829f88ad5b64be9fba56e56bc9ebdefc619e43",
        "insightface buffalo_l (model-zoo release v0.7)",
    ),
    "det_10g.onnx": (
        "sha256",
        "5838f7fe053675b1c7a08b633df49e7af5495cee0493c7dcf6697200b85b5b91",
        "insightface buffalo_l (model-zoo release v0.7)",
    ),
    "vgg16-397923af.pth": ("sha256-prefix", "397923af", "torchvision ImageNet VGG16 (hash in the file name)"),
    "lpips_vgg_v0.1.pth": ("md5", "d507d7349b931f0638a25a48a722f98a", "lpips v0.1 vgg.pth"),
    "pt_inception-2015-12-05-6726825d.pth": (
        "sha256-prefix",
        "6726825d",
        "pytorch-fid's FID Inception (hash in the file name)",
    ),
}
SD_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
HASH_LIMIT_BYTES = 2 * 1024**3


@dataclass
class WeightCheck:
    """One weights file: what it is for, where it was looked for, and what was found."""

    name: str
    used_by: str
    looked_at: list[str]
    path: str | None = None
    size: int | None = None
    digest: str | None = None
    status: str = "missing"  # missing | ok | differs | unverified | found
    note: str = ""


@dataclass
class Report:
    python: str
    platform: str
    gpus: list[str]
    torch: dict
    onnxruntime: dict
    faiss: dict
    weights: list[WeightCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.md5() if algorithm == "md5" else hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file(name: str, used_by: str, candidates: list[Path], verify: bool = True) -> WeightCheck:
    """Find the first existing file among ``candidates`` and compare it with the published digest."""
    check = WeightCheck(name=name, used_by=used_by, looked_at=[str(c) for c in candidates])
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return check
    check.path, check.size = str(found), found.stat().st_size
    known = KNOWN_DIGESTS.get(found.name) or KNOWN_DIGESTS.get(name)
    if known is None:
        check.status, check.note = "found", "no published digest known"
        if verify and check.size <= HASH_LIMIT_BYTES:
            check.digest = "sha256:" + _digest(found, "sha256")
        return check
    algorithm, expected, source = known
    if not verify:
        check.status, check.note = "found", "not verified (--no-verify)"
        return check
    actual = _digest(found, "md5" if algorithm == "md5" else "sha256")
    check.digest = f"{'md5' if algorithm == 'md5' else 'sha256'}:{actual}"
    matches = actual.startswith(expected) if algorithm == "sha256-prefix" else actual == expected
    check.status = "ok" if matches else "differs"
    check.note = f"{'matches' if matches else 'differs from'} {source}"
    return check


def _torch_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"installed": False, "note": "not installed (the [train] extra)"}
    return {"installed": True, **devices.torch_summary(torch)}


def _ort_info() -> dict:
    packages = devices.installed_versions(devices.ORT_PACKAGES)
    try:
        import onnxruntime as ort
    except ImportError:
        return {"installed": False, "packages": packages, "providers": []}
    return {"installed": True, "packages": packages, "providers": list(ort.get_available_providers())}


def _faiss_info() -> dict:
    packages = devices.installed_versions(devices.FAISS_PACKAGES)
    try:
        faiss = load_faiss()
    except ImportError:
        return {"installed": False, "packages": packages, "gpus": 0}
    get = getattr(faiss, "get_num_gpus", None)
    return {"installed": True, "packages": packages, "gpus": int(get()) if get else 0}


def _weights(
    model_root: Path | None,
    weights_dir: Path | None,
    sd: Path | None,
    deepface_home: Path | None,
    verify: bool,
) -> list[WeightCheck]:
    insight = model_root or default_model_root()
    packs = [insight] if model_root else [insight.parent / pack for pack in ARCFACE_FILES]
    arcface = [p / f for p in packs for f in ARCFACE_FILES.values()]
    if weights_dir:
        arcface.insert(0, weights_dir / "w600k_r50.onnx")
    checks = [
        check_file("ArcFace", "embed (--embedder arcface), identity loss, IDS metric", arcface, verify),
        check_file("SCRFD det_10g.onnx", "detect (--detector scrfd)", [insight / "det_10g.onnx"], verify),
    ]

    wdir = weights_dir or Path(os.environ.get("REFFACE_WEIGHTS", "weights"))
    labels = {
        "arcface": ("ArcFace (evaluation)", "IDS metric"),
        "lpips_backbone": ("LPIPS VGG16 backbone", "LPIPS / fLPIPS metric, ReF-LDM VQGAN loss"),
        "lpips_head": ("LPIPS v0.1 head", "LPIPS / fLPIPS metric, ReF-LDM VQGAN loss"),
        "inception": ("FID Inception", "FID metric"),
        "niqe_params": ("NIQE pristine model", "NIQE metric"),
        "fid_stats": ("FID reference statistics", "FID metric (refldm protocol)"),
        "musiq": ("MUSIQ", "MUSIQ metric (refldm protocol)"),
    }
    seen: set[str] = set()
    for protocol, files in DEFAULT_WEIGHT_FILES.items():
        for key, fname in files.items():
            if fname in seen or (key == "arcface" and fname == "w600k_r50.onnx"):
                continue  # buffalo_l's recognizer is the ArcFace row above
            seen.add(fname)
            label, used = labels.get(key, (key, "evaluation"))
            checks.append(
                check_file(f"{label} [{fname}]", f"{used} ({protocol} protocol)", [wdir / fname], verify)
            )

    home = deepface_home or (Path(os.environ["DEEPFACE_HOME"]) if os.environ.get("DEEPFACE_HOME") else None)
    for attr, fname in DEEPFACE_WEIGHT_FILES.items():
        where = [home / ".deepface" / "weights" / fname] if home else []
        check = check_file(f"deepface {attr}", "attributes (prompts)", where, verify)
        if home is None:
            check.note = "set DEEPFACE_HOME or pass --deepface-home"
        checks.append(check)
    checks.append(_sd_check(sd or (Path(os.environ["REFFACE_SD"]) if os.environ.get("REFFACE_SD") else None)))
    dlib_dir = face_recognition_models_dir()
    checks.append(
        check_file(
            "dlib ResNet (offline default)",
            "embed (--embedder dlib), detect (--detector dlib)",
            [dlib_dir / "dlib_face_recognition_resnet_model_v1.dat"],
            verify,
        )
    )
    return checks


def _sd_check(sd: Path | None) -> WeightCheck:
    check = WeightCheck(name="Stable Diffusion folder", used_by="MGFR training / restore", looked_at=[])
    if sd is None:
        check.note = "pass --sd or set REFFACE_SD to a diffusers SD 1.x/2.x folder"
        return check
    check.looked_at = [str(sd)]
    if not sd.is_dir():
        return check
    missing = [p for p in SD_PARTS if not (sd / p).exists()]
    check.path = str(sd)
    check.status = "found" if not missing else "incomplete"
    check.note = "complete diffusers layout" if not missing else f"missing {', '.join(missing)}"
    return check


def collect(
    model_root: Path | None = None,
    weights_dir: Path | None = None,
    sd: Path | None = None,
    deepface_home: Path | None = None,
    verify: bool = True,
) -> Report:
    """Build the doctor's report (nothing is downloaded; weights are hashed unless ``verify`` is off)."""
    torch_info = _torch_info()
    gpus = list(devices.nvidia_gpus())
    if not gpus and torch_info.get("cuda_devices"):
        gpus = list(torch_info["cuda_devices"])
    report = Report(
        python=sys.version.split()[0],
        platform=platform.platform(),
        gpus=gpus,
        torch=torch_info,
        onnxruntime=_ort_info(),
        faiss=_faiss_info(),
    )
    report.weights = _weights(model_root, weights_dir, sd, deepface_home, verify)
    report.warnings = warnings_for(report)
    return report


def warnings_for(report: Report) -> list[str]:
    """Everything that would make a stage run on the CPU on a GPU machine, or not run at all."""
    out = []
    ort_pkgs = report.onnxruntime.get("packages", {})
    if len(ort_pkgs) > 1:
        out.append(f"both onnxruntime builds are installed ({', '.join(ort_pkgs)}); fix: {devices.ORT_FIX}")
    faiss_pkgs = report.faiss.get("packages", {})
    if len(faiss_pkgs) > 1:
        out.append(f"several FAISS builds are installed ({', '.join(faiss_pkgs)}); fix: {devices.FAISS_FIX}")
    if report.gpus:
        if (
            report.onnxruntime.get("installed")
            and "CUDAExecutionProvider" not in report.onnxruntime["providers"]
        ):
            out.append(
                "GPU present but onnxruntime has no CUDAExecutionProvider: SCRFD and ArcFace would run on "
                f"the CPU (refface refuses unless {devices.ALLOW_CPU_ENV}=1); "
                f"{devices.ort_diagnosis(report.onnxruntime['providers'])}; fix: {devices.ORT_FIX}"
            )
        if report.faiss.get("installed") and report.faiss["gpus"] == 0:
            out.append(
                f"GPU present but FAISS sees none: neighbour search runs on the CPU; fix: {devices.FAISS_FIX}"
            )
        if report.torch.get("installed") and not report.torch.get("cuda_devices"):
            build = report.torch.get("cuda_build")
            why = (
                "a CPU build of torch is installed" if build is None else f"torch (CUDA {build}) sees no GPU"
            )
            out.append(f"GPU present but {why}: training runs on the CPU; fix: `make install GPU=1`")
    for check in report.weights:
        if check.status == "differs":
            out.append(f"{check.name}: {check.path} {check.note} ({check.digest})")
    return out


def render(report: Report) -> None:
    """Print the report as tables on stdout."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # piped into a file or a README: do not squeeze to 80 columns
    env = Table(title="refface doctor: compute", show_header=False, title_justify="left")
    env.add_column("what", style="bold")
    env.add_column("value")
    env.add_row("python", f"{report.python} ({report.platform})")
    env.add_row("GPUs", ", ".join(report.gpus) or "none")
    t = report.torch
    env.add_row(
        "torch",
        "not installed"
        if not t.get("installed")
        else f"{t['version']} (CUDA build {t['cuda_build'] or 'none'}); "
        f"CUDA devices: {', '.join(t['cuda_devices']) or 'none'}",
    )
    o = report.onnxruntime
    pk = ", ".join(f"{k} {v}" for k, v in o["packages"].items()) or "not installed"
    env.add_row("onnxruntime", f"{pk}; providers: {', '.join(o['providers']) or 'none'}")
    f = report.faiss
    fk = ", ".join(f"{k} {v}" for k, v in f["packages"].items()) or "not installed"
    env.add_row("faiss", f"{fk}; GPUs: {f['gpus']}")
    console.print(env)

    weights = Table(title="refface doctor: weights", title_justify="left")
    weights.add_column("weights", no_wrap=True)
    weights.add_column("status", no_wrap=True)
    weights.add_column("where", overflow="fold")
    weights.add_column("note")
    style = {"ok": "green", "differs": "red", "missing": "yellow", "incomplete": "yellow"}
    for c in report.weights:
        more = f" (+{len(c.looked_at) - 1} more)" if len(c.looked_at) > 1 else ""
        where = c.path or (f"not in {c.looked_at[0]}{more}" if c.looked_at else "-")
        status = f"[{style.get(c.status, 'white')}]{c.status}[/]"
        weights.add_row(escape(c.name), status, escape(where), escape(c.note))
    console.print(weights)
    if report.warnings:
        for w in report.warnings:
            console.print(f"[bold yellow]warning:[/] {escape(w)}")
    else:
        console.print("no warnings")
