"""ReF-LDM parity with the official code at the paper configuration: one forward of each output.

Runs the official modules (ChiWeiHsiao/ref-ldm, the commit named in tests/data/make_refldm_goldens.py,
imported from the folder given on the command line; needs einops, omegaconf and
taming-transformers-rom1504) and refface's converted models on the same seeded weights (derived from
the official key names and shapes), then records the max / mean absolute difference of every output:
the UNet, CacheKV with 1 and 5 references, the CFG ε, VQGAN encode / decode, joint reference encoding.
The small-config goldens and the 3-step DDIM sample are checked in CI (tests/test_refldm_official.py).

    python bench/refldm_parity.py /path/to/ref-ldm [--batch 1] [--config paper|small]

Writes bench/results/refldm_parity.{json,md}. CPU-heavy at the paper config (512² images, 117.8 M UNet).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _goldens_module():
    path = ROOT / "tests" / "data" / "make_refldm_goldens.py"
    spec = importlib.util.spec_from_file_location("make_refldm_goldens", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def refface_outputs(unet, vq, inputs: dict) -> dict:
    from refface.train.refldm.cachekv import RefCache
    from refface.train.refldm.sampling import guided_eps
    from refface.train.refldm.vqgan import decode, encode, encode_references

    x, lq, t, refs = inputs["x"], inputs["lq"], inputs["t"], inputs["refs"]
    out = {"unet_plain": unet.unet(torch.cat([x, lq], 1), t).sample}
    for k in (1, 5):
        out[f"cachekv_{k}"] = unet(x, lq, t, ref_latents=refs[:, :k])
    two = refs[:, :2]
    cache = RefCache.cat([unet.build_cache(two), unet.build_cache(torch.zeros_like(two))])
    out["cfg_eps"] = guided_eps(unet, x, torch.cat([lq, lq]), torch.cat([t, t]), cache, 1.5)
    z = encode(vq, inputs["images"])
    out["vq_encode"] = z
    out["vq_decode"] = decode(vq, z, quantize=True)
    out["vq_decode_noquant"] = decode(vq, z, quantize=False)
    joint = encode_references(vq, inputs["ref_images"], joint=True)
    out["joint_ref_latents"] = torch.cat(list(joint.unbind(1)), dim=-1)
    return out


def main() -> None:
    from refface.train.refldm import official, official_keys
    from refface.train.refldm.model import RefLDMUNet
    from refface.train.refldm.vqgan import build_vqgan

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("official", type=Path, help="checkout of ChiWeiHsiao/ref-ldm")
    p.add_argument("--config", choices=["paper", "small"], default="paper")
    p.add_argument("--batch", type=int, default=1, help="targets per forward (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "refldm_parity")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gold = _goldens_module()
    t0 = time.perf_counter()
    model = gold.build_official(args.official, args.config)
    arch = gold.CONFIGS[args.config]
    inputs = {k: v[: args.batch] for k, v in gold.make_inputs(args.config).items()}
    inputs["ref_images"] = gold.make_inputs(args.config)["ref_images"]
    theirs = gold.official_outputs(model, inputs, sample_steps=None)
    t_official = time.perf_counter() - t0

    t0 = time.perf_counter()
    ucfg, vcfg = official.configs_from_official(arch["unet"], arch["vq"])
    unet = RefLDMUNet.from_unet_config(ucfg).eval()
    rules = official_keys.unet_rules(ucfg)
    official_keys.load_strict(
        unet,
        official_keys.to_refface(
            official_keys.seeded_state(official_keys.official_shapes(unet, rules)), rules, "unet"
        ),
        "unet",
    )
    vq = build_vqgan(vcfg).eval()
    vrules = official_keys.vqgan_rules(vcfg)
    vstate = official_keys.seeded_state(official_keys.official_shapes(vq, vrules))
    official_keys.load_strict(vq, official_keys.to_refface(vstate, vrules, "vqgan"), "vqgan")
    ours = refface_outputs(unet, vq, inputs)
    t_refface = time.perf_counter() - t0

    rows = {}
    for name, ref in ours.items():
        d = (ref.float() - theirs[name].float()).abs()
        rows[name] = {
            "shape": list(ref.shape),
            "max_abs_diff": float(d.max()),
            "mean_abs_diff": float(d.mean()),
            "official_abs_mean": float(theirs[name].float().abs().mean()),
        }
    official_unet = sum(p.numel() for p in model.model.diffusion_model.parameters())
    official_vq = sum(
        p.numel() for n, p in model.first_stage_model.named_parameters() if not n.startswith("loss.")
    )
    result = {
        "config": args.config,
        "official_commit": gold.OFFICIAL_COMMIT,
        "batch": args.batch,
        "threads": args.threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "parameters": {
            "unet_official": official_unet,
            "unet_refface": sum(p.numel() for p in unet.parameters()),
            "vqgan_official": official_vq,
            "vqgan_refface": sum(p.numel() for p in vq.parameters()),
        },
        "seconds": {"official": round(t_official, 1), "refface": round(t_refface, 1)},
        "outputs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# ReF-LDM parity with the official code ({args.config} config)",
        "",
        f"Official commit {gold.OFFICIAL_COMMIT[:7]}; seeded random weights; batch {args.batch}; fp32 on CPU "
        f"({args.threads} threads). Parameters: UNet {official_unet:,} (official) / "
        f"{result['parameters']['unet_refface']:,} (refface); VQGAN {official_vq:,} / "
        f"{result['parameters']['vqgan_refface']:,}.",
        "",
        "| output | shape | max abs diff | mean abs diff | mean abs value |",
        "|---|---|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {'×'.join(map(str, r['shape']))} | {r['max_abs_diff']:.2e} | {r['mean_abs_diff']:.2e} "
            f"| {r['official_abs_mean']:.3g} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
