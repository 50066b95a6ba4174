"""Every install combination resolves with pip into a scratch venv; the CPU ones install for real.

    python bench/install_check.py [--skip-real] [--keep]

For each extras combination of refface (docs/install.md):
  - cpu             mining only (no torch): real install; imports; `refface --help`; ORT providers,
                    faiss.get_num_gpus(); torch must be absent
  - cpu,train       + the trainers with the CPU torch (torch==2.13.0): real install; imports;
                    torch.version.cuda is None
  - gpu             mining on the GPU: `pip install --dry-run --report` (multi-GB CUDA wheels);
                    onnxruntime-gpu and faiss-gpu resolve, the CPU builds do not
  - gpu,train       + the CUDA torch: dry run; torch resolves to the CUDA build (nvidia-* wheels)
Writes bench/results/install_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CPU_ONLY = {"onnxruntime", "faiss-cpu"}
GPU_ONLY = {"onnxruntime-gpu", "faiss-gpu", "faiss-gpu-cu12"}

PROBE = r"""
import json, sys
from importlib import metadata
out = {}
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
out["distributions"] = {n: version(n) for n in
    ("onnxruntime", "onnxruntime-gpu", "faiss-cpu", "faiss-gpu", "torch", "diffusers", "accelerate")}
import onnxruntime as ort
out["ort_providers"] = ort.get_available_providers()
import faiss
out["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
import refface.mining.pipeline, refface.builders.ffhq_ref, refface.doctor  # mining imports without torch
try:
    import torch
    out["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                    "cuda_available": torch.cuda.is_available()}
    import refface.train.loop, refface.train.refldm.train, refface.train.mgfr.train
except ImportError as e:
    out["torch"] = f"not importable: {e}"
print(json.dumps(out))
"""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def make_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def real_install(extras: str, torch_spec: str | None, workdir: Path) -> dict:
    py = make_venv(workdir / f"venv-{extras.replace(',', '-')}")
    start = time.perf_counter()
    steps = []
    if torch_spec:
        steps.append([str(py), "-m", "pip", "install", "-q", torch_spec])
    steps.append([str(py), "-m", "pip", "install", "-q", f"{REPO}[{extras}]"])
    for cmd in steps:
        done = run(cmd)
        if done.returncode != 0:
            return {"ok": False, "step": " ".join(cmd[3:]), "error": done.stderr[-2000:]}
    seconds = round(time.perf_counter() - start, 1)
    probe = run([str(py), "-c", PROBE], cwd=workdir)
    if probe.returncode != 0:
        return {"ok": False, "step": "import probe", "error": probe.stderr[-2000:], "seconds": seconds}
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    helped = run([str(py.parent / "refface"), "--help"], cwd=workdir)
    info["cli_help_ok"] = helped.returncode == 0 and "doctor" in helped.stdout
    doctor = run([str(py.parent / "refface"), "doctor", "--no-verify"], cwd=workdir)
    info["doctor_ok"] = doctor.returncode == 0
    freeze = run([str(py), "-m", "pip", "freeze"]).stdout.lower()
    info["nvidia_wheels"] = sorted(
        {line.split("==")[0] for line in freeze.splitlines() if line.startswith("nvidia-")}
    )
    info["seconds"] = seconds
    checks = {
        "one onnxruntime build (CPU)": info["distributions"]["onnxruntime"] is not None
        and info["distributions"]["onnxruntime-gpu"] is None,
        "one FAISS build (CPU)": info["distributions"]["faiss-cpu"] is not None
        and info["distributions"]["faiss-gpu"] is None,
        "CPUExecutionProvider present": "CPUExecutionProvider" in info["ort_providers"],
        "refface --help and refface doctor run": info["cli_help_ok"] and info["doctor_ok"],
        "no CUDA wheels": not info["nvidia_wheels"],
    }
    if "train" in extras:
        checks["CPU torch (torch.version.cuda is None)"] = (
            isinstance(info["torch"], dict) and info["torch"]["cuda_build"] is None
        )
    else:
        checks["no torch in a mining-only install"] = info["distributions"]["torch"] is None
    return {"ok": all(checks.values()), "checks": checks, "probe": info}


def dry_run(extras: str, torch_spec: str | None, workdir: Path) -> dict:
    py = make_venv(workdir / f"venv-dry-{extras.replace(',', '-')}")
    report = workdir / f"report-{extras.replace(',', '-')}.json"
    cmd = [str(py), "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report)]
    cmd += [f"{REPO}[{extras}]"] + ([torch_spec] if torch_spec else [])
    start = time.perf_counter()
    done = run(cmd)
    if done.returncode != 0:
        return {"ok": False, "step": "pip install --dry-run", "error": done.stderr[-2000:]}
    resolved = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads(report.read_text())["install"]
    }
    nvidia = sorted(n for n in resolved if n.startswith("nvidia-"))
    checks = {
        "onnxruntime-gpu resolves": "onnxruntime-gpu" in resolved,
        "FAISS GPU resolves": "faiss-gpu" in resolved,
        "no CPU onnxruntime / faiss-cpu": not (CPU_ONLY & set(resolved)),
        "CUDA libraries resolve (nvidia-* wheels)": bool(nvidia),
    }
    if "train" in extras:
        checks["torch resolves to a CUDA build (not +cpu)"] = (
            "torch" in resolved and "+cpu" not in resolved["torch"]
        )
    else:
        checks["no torch in a mining-only install"] = "torch" not in resolved
    pick = ("onnxruntime-gpu", "faiss-gpu", "torch", "onnx", "diffusers", "accelerate")
    return {
        "ok": all(checks.values()),
        "checks": checks,
        "resolved": {k: resolved[k] for k in pick if k in resolved},
        "nvidia_wheels": {n: resolved[n] for n in nvidia},
        "packages": len(resolved),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-real", action="store_true", help="only the dry runs")
    ap.add_argument("--keep", action="store_true", help="keep the scratch venvs (printed)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="refface-install-check-"))
    combos = [("gpu", None, "dry"), ("gpu,train", "torch", "dry")]
    if not args.skip_real:
        combos += [("cpu", None, "real"), ("cpu,train", "torch==2.13.0", "real")]
    results = {}
    try:
        for extras, torch_spec, kind in combos:
            print(f"[{kind}] refface[{extras}] {torch_spec or ''}", flush=True)
            fn = real_install if kind == "real" else dry_run
            results[extras] = {"kind": kind, "torch_spec": torch_spec, **fn(extras, torch_spec, workdir)}
            print("   ", "ok" if results[extras]["ok"] else f"FAILED {results[extras]}", flush=True)
            write_results(results)  # after every combination: a stopped run keeps what it checked
    finally:
        if args.keep:
            print("scratch venvs kept in", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print((RESULTS / "install_check.md").read_text())
    return 0 if all(r["ok"] for r in results.values()) else 1


def write_results(results: dict) -> None:
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pip": run([sys.executable, "-m", "pip", "--version"]).stdout.split()[1],
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "install_check.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Install check: every extras combination resolves (bench/install_check.py)",
        "",
        f"Python {out['python']}, pip {out['pip']}, {out['platform']}. `real`: installed into a scratch venv and "
        "imported; `dry`: `pip install --dry-run --report` (the CUDA wheels are several GB).",
        "",
        "| extras | torch | how | result | checks |",
        "|---|---|---|---|---|",
    ]
    for extras, r in results.items():
        checks = (
            "<br>".join(f"{'✓' if v else '✗'} {k}" for k, v in r.get("checks", {}).items())
            or r.get("error", "")[:200]
        )
        lines.append(
            f"| `[{extras}]` | {r['torch_spec'] or '-'} | {r['kind']} | {'ok' if r['ok'] else 'FAILED'} | {checks} |"
        )
    lines += ["", "Resolved / installed versions:", ""]
    for extras, r in results.items():
        if r["kind"] == "dry":
            lines.append(
                f"- `[{extras}]`: {r.get('resolved')}; {len(r.get('nvidia_wheels', {}))} nvidia-* wheels; {r.get('packages')} packages"
            )
        elif "probe" in r:
            p = r["probe"]
            dists = {k: v for k, v in p["distributions"].items() if v}
            lines.append(
                f"- `[{extras}]`: {dists}; ORT providers {p['ort_providers']}; faiss GPUs {p['faiss_gpus']}; "
                f"torch {p['torch'] if isinstance(p['torch'], dict) else 'absent'}; install {p['seconds']} s"
            )
    (RESULTS / "install_check.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
