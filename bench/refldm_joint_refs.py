"""What joint reference encoding changes: reference latents and the CacheKV ε, joint vs separate.

The official ReF-LDM encodes a sample's K references side by side in one image with one VQGAN
encoder pass and splits the latent back into K pieces; refface's ``separate`` mode encodes each
alone. This measures, at the paper configuration on the demo sample (``../shared/data/refldm_demo``:
LQ + 4 references, 512² FFHQ-aligned), how far apart the two encodings are: per reference latent
(relative L2, max abs), by latent column (the borders between references vs the interior), and the
UNet's ε with CacheKV fed either set (one forward, t = 500). Weights are the seeded random ones of the
parity tests (no released weights here), so the figures show the size of the architectural effect,
not a restoration quality difference.

    .venv/bin/python bench/refldm_joint_refs.py [--demo ../shared/data/refldm_demo]

Writes bench/results/refldm_joint_refs.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def seeded_models():
    from refface.train.refldm import official_keys
    from refface.train.refldm.model import RefLDMUNet, UNetConfig
    from refface.train.refldm.vqgan import VQGANConfig, build_vqgan

    ucfg, vcfg = UNetConfig(), VQGANConfig()
    unet = RefLDMUNet.from_unet_config(ucfg).eval()
    rules = official_keys.unet_rules(ucfg)
    state = official_keys.seeded_state(official_keys.official_shapes(unet, rules))
    official_keys.load_strict(unet, official_keys.to_refface(state, rules, "unet"), "unet")
    vq = build_vqgan(vcfg).eval()
    vrules = official_keys.vqgan_rules(vcfg)
    official_keys.load_strict(
        vq,
        official_keys.to_refface(
            official_keys.seeded_state(official_keys.official_shapes(vq, vrules)), vrules, "vq"
        ),
        "vq",
    )
    return unet, vq


@torch.no_grad()
def main() -> None:
    from refface.manifests.io import read_image
    from refface.train.refldm.vqgan import encode, encode_references

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=ROOT.parent / "shared" / "data" / "refldm_demo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "refldm_joint_refs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def load(name: str) -> torch.Tensor:
        return torch.from_numpy(read_image(args.demo / name)).permute(2, 0, 1).float() / 127.5 - 1.0

    refs = torch.stack([load(f"ref{i}.png") for i in range(4)])[None]  # (1, 4, 3, 512, 512)
    lq = load("lq.png")[None]
    unet, vq = seeded_models()
    joint = encode_references(vq, refs, joint=True)
    alone = encode_references(vq, refs, joint=False)
    per_ref = []
    for i in range(refs.shape[1]):
        d = joint[0, i] - alone[0, i]
        per_ref.append(
            {
                "relative_l2": float(d.norm() / alone[0, i].norm()),
                "max_abs_diff": float(d.abs().max()),
                "mean_abs_diff": float(d.abs().mean()),
            }
        )
    cols = (joint - alone).abs().mean(dim=(0, 1, 2, 3))  # per latent column within a piece (64)
    edge = 4
    column = {
        "border_columns_mean_abs_diff": float(torch.cat([cols[:edge], cols[-edge:]]).mean()),
        "interior_columns_mean_abs_diff": float(cols[edge:-edge].mean()),
        "latent_mean_abs": float(alone.abs().mean()),
    }
    zlq = encode(vq, lq)
    x = torch.randn(zlq.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    eps_joint = unet(x, zlq, t, ref_latents=joint)
    eps_alone = unet(x, zlq, t, ref_latents=alone)
    eps_none = unet(x, zlq, t)
    d = eps_joint - eps_alone
    eps = {
        "relative_l2_joint_vs_separate": float(d.norm() / eps_alone.norm()),
        "max_abs_diff": float(d.abs().max()),
        "relative_l2_refs_vs_no_refs": float((eps_alone - eps_none).norm() / eps_alone.norm()),
    }
    result = {
        "demo": str(args.demo),
        "config": "paper (configs/refldm.yaml), seeded random weights",
        "threads": args.threads,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - t0, 1),
        "reference_latents": per_ref,
        "columns": column,
        "eps": eps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Joint vs separate reference encoding (paper config, seeded random weights, demo sample)",
        "",
        "| reference | relative L2 change of its latent | max abs diff | mean abs diff |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| ref{i} | {r['relative_l2']:.3f} | {r['max_abs_diff']:.3f} | {r['mean_abs_diff']:.4f} |"
        for i, r in enumerate(per_ref)
    ]
    lines += [
        "",
        f"Mean abs difference in the {edge} latent columns at each piece's left/right border: "
        f"{column['border_columns_mean_abs_diff']:.4f}; interior columns: {column['interior_columns_mean_abs_diff']:.4f} "
        f"(mean abs latent value {column['latent_mean_abs']:.3f}).",
        "",
        f"UNet ε with CacheKV (t = 500): joint vs separate references differ by "
        f"{eps['relative_l2_joint_vs_separate']:.4f} relative L2 (max abs {eps['max_abs_diff']:.4f}); "
        f"references vs none: {eps['relative_l2_refs_vs_no_refs']:.4f}.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
