"""The official ReF-LDM release: converter round trip and strictness, parity with the official modules.

The goldens (tests/data/refldm_parity_small.safetensors) were produced by tests/data/make_refldm_goldens.py
running the official code; both sides derive every weight from its official key name and shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from common.tiny_refldm import _one_thread  # noqa: F401  (autouse fixture)

from refface.train.refldm import official, official_keys
from refface.train.refldm.model import RefLDMUNet, UNetConfig, official_timesteps
from refface.train.refldm.sampling import ddim_sample, guided_eps, to_uint8
from refface.train.refldm.vqgan import VQGANConfig, build_vqgan, decode, encode, encode_references

GOLDEN = Path(__file__).parent / "data" / "refldm_parity_small.safetensors"


@pytest.fixture(scope="module")
def golden():
    from safetensors import safe_open

    with safe_open(str(GOLDEN), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


@pytest.fixture(scope="module")
def models(golden):
    """refface's UNet and VQGAN at the goldens' config, filled with the same seeded official weights."""
    _, meta = golden
    arch = json.loads(meta["config"])
    ucfg, vcfg = official.configs_from_official(arch["unet"], arch["vq"])
    unet = RefLDMUNet.from_unet_config(ucfg).eval()
    rules = official_keys.unet_rules(ucfg)
    state = official_keys.seeded_state(official_keys.official_shapes(unet, rules))
    official_keys.load_strict(unet, official_keys.to_refface(state, rules, "unet"), "unet")
    vq = build_vqgan(vcfg).eval()
    vrules = official_keys.vqgan_rules(vcfg)
    vstate = official_keys.seeded_state(official_keys.official_shapes(vq, vrules))
    official_keys.load_strict(vq, official_keys.to_refface(vstate, vrules, "vqgan"), "vqgan")
    return unet, vq, ucfg, vcfg


def close(a, b, tol):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.3g} > {tol}"


def test_golden_states_the_official_commit(golden):
    _, meta = golden
    assert meta["official_commit"] == official.OFFICIAL_COMMIT


@torch.no_grad()
def test_unet_matches_official(golden, models):
    g, _ = golden
    unet = models[0]
    x, lq, t = g["in.x"], g["in.lq"], g["in.t"]
    close(unet.unet(torch.cat([x, lq], 1), t).sample, g["out.unet_plain"], 1e-4)


@pytest.mark.parametrize("k", [1, 5])
@torch.no_grad()
def test_cachekv_matches_official(golden, models, k):
    g, _ = golden
    unet = models[0]
    out = unet(g["in.x"], g["in.lq"], g["in.t"], ref_latents=g["in.refs"][:, :k])
    close(out, g[f"out.cachekv_{k}"], 1e-4)


@torch.no_grad()
def test_cfg_matches_official(golden, models):
    g, _ = golden
    unet = models[0]
    refs, lq = g["in.refs"][:, :2], g["in.lq"]
    from refface.train.refldm.cachekv import RefCache

    cache = RefCache.cat([unet.build_cache(refs), unet.build_cache(torch.zeros_like(refs))])
    out = guided_eps(unet, g["in.x"], torch.cat([lq, lq]), torch.cat([g["in.t"]] * 2), cache, 1.5)
    close(out, g["out.cfg_eps"], 1e-4)


@torch.no_grad()
def test_vqgan_matches_official(golden, models):
    g, _ = golden
    vq = models[1]
    z = encode(vq, g["in.images"])
    close(z, g["out.vq_encode"], 1e-4)
    close(decode(vq, g["out.vq_encode"], quantize=True), g["out.vq_decode"], 1e-4)
    close(decode(vq, g["out.vq_encode"], quantize=False), g["out.vq_decode_noquant"], 1e-4)


@torch.no_grad()
def test_joint_reference_encoding_matches_official(golden, models):
    g, _ = golden
    vq = models[1]
    refs = g["in.ref_images"]  # (1, 2, 3, H, W)
    joint = encode_references(vq, refs, joint=True)
    expected = torch.stack(g["out.joint_ref_latents"].chunk(refs.shape[1], dim=-1), dim=1)
    close(joint, expected, 1e-4)
    # Encoding each reference alone gives different latents (the encoder mixes them when joint).
    alone = encode_references(vq, refs, joint=False)
    assert (alone - joint).abs().max().item() > 1e-3
    # With a padding reference, the present ones are encoded jointly among themselves only.
    mask = torch.tensor([[True, False]])
    padded = encode_references(vq, refs, mask, joint=True)
    close(padded[:, 0], encode(vq, refs[:, 0]), 1e-5)
    assert float(padded[:, 1].abs().max()) == 0.0


def test_official_timesteps_match_the_official_sampler(golden):
    g, _ = golden
    assert official_timesteps(3) == sorted(g["out.sample_timesteps"].tolist(), reverse=True)
    fifty = official_timesteps(50)
    assert fifty[0] == 999 and fifty[-1] == 19 and len(fifty) == 50


@torch.no_grad()
def test_three_step_official_sample_matches(golden, models):
    g, _ = golden
    unet, vq = models[0], models[1]
    lq = encode(vq, g["in.images"][:1])
    refs = encode_references(vq, g["in.ref_images"], joint=True)
    latent = ddim_sample(
        unet, lq, refs, steps=3, spacing="uniform_trailing", guidance_scale=1.5, init_noise=g["in.x_T"]
    )
    close(latent, g["out.sample_latent"], 1e-3)
    image = decode(vq, latent, quantize=True)
    close(image, g["out.sample_image"], 1e-3)
    ours = to_uint8(image, "truncate").permute(0, 3, 1, 2)
    # Truncation can flip a value that sits on an integer boundary; allow one level on a few pixels.
    diff = (ours.int() - g["out.sample_uint8"].int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


# ----------------------------------------------------------------------------------------------------
# the converter


def small_cfgs():
    ucfg = UNetConfig(
        latent_channels=4, sample_size=8, base_channels=32, channel_mult=[1, 2], layers_per_block=2,
        attention_levels=[False, True], attention_head_dim=16, norm_num_groups=32,
    )  # fmt: skip
    vcfg = VQGANConfig(
        block_out_channels=[32, 32, 64], layers_per_block=1, latent_channels=4, num_vq_embeddings=32
    )
    return ucfg, vcfg


def test_round_trip_is_identity():
    ucfg, vcfg = small_cfgs()
    torch.manual_seed(0)
    unet, vq = RefLDMUNet.from_unet_config(ucfg), build_vqgan(vcfg)
    for module, rules in ((unet, official_keys.unet_rules(ucfg)), (vq, official_keys.vqgan_rules(vcfg))):
        state = module.state_dict()
        back = official_keys.to_refface(official_keys.to_official(state, rules, "x"), rules, "x")
        assert set(back) == set(state)
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_qkv_is_split_per_head():
    # A fused qkv whose rows are tagged [head][q|k|v][channel] splits into per-projection rows.
    rule = official_keys.Rule("qkv.weight", ("q", "k", "v"), "qkv", 1, heads=2)
    c, d = 4, 2
    rows = torch.arange(3 * c, dtype=torch.float32)[:, None, None].expand(3 * c, c, 1)
    q, k, v = official_keys._to_refface(rule, rows)
    # head 0: rows 0-1 q, 2-3 k, 4-5 v; head 1: rows 6-7 q, 8-9 k, 10-11 v
    assert (
        q[:, 0].tolist() == [0, 1, 6, 7]
        and k[:, 0].tolist() == [2, 3, 8, 9]
        and v[:, 0].tolist() == [4, 5, 10, 11]
    )
    assert q.shape == (c, c) and d * 2 == c


def test_corrupted_key_is_listed():
    ucfg, _ = small_cfgs()
    unet = RefLDMUNet.from_unet_config(ucfg)
    rules = official_keys.unet_rules(ucfg)
    state = official_keys.to_official(unet.state_dict(), rules, "unet")
    state["input_blocks.1.0.in_layers.0.wieght"] = state.pop("input_blocks.1.0.in_layers.0.weight")
    with pytest.raises(official_keys.KeyMismatchError) as e:
        official_keys.to_refface(state, rules, "ReF-LDM UNet")
    assert e.value.missing == ["input_blocks.1.0.in_layers.0.weight"]
    assert e.value.unmapped == ["input_blocks.1.0.in_layers.0.wieght"]
    assert "input_blocks.1.0.in_layers.0.wieght" in str(e.value)


def test_ema_names_recovered_from_the_official_list(golden, models):
    # Every name LitEma gives the official UNet (dots removed) maps back to exactly one parameter.
    _, meta = golden
    ucfg = models[2]
    names = json.loads(meta["ema_names"])
    rules = official_keys.unet_rules(ucfg)
    state = {official.EMA_PREFIX + n: torch.zeros(1) for n in names}
    got, source = official.unet_tensors(state, rules)
    assert source == "ema" and set(got) == {r.official for r in rules}


def _release(tmp_path: Path, ucfg, vcfg, with_ema: bool):
    """Write a refldm.ckpt / vqgan.ckpt pair in the official layout with seeded weights."""
    unet, vq = RefLDMUNet.from_unet_config(ucfg), build_vqgan(vcfg)
    urules, vrules = official_keys.unet_rules(ucfg), official_keys.vqgan_rules(vcfg)
    live = official_keys.seeded_state(official_keys.official_shapes(unet, urules))
    ema = official_keys.seeded_state(official_keys.official_shapes(unet, urules), salt=1)
    sd = {official.UNET_PREFIX + k: v for k, v in live.items()}
    if with_ema:
        sd |= {official.EMA_PREFIX + ("diffusion_model." + k).replace(".", ""): v for k, v in ema.items()}
        sd |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}
    vstate = official_keys.seeded_state(official_keys.official_shapes(vq, vrules))
    torch.save({"state_dict": sd, "global_step": 10}, tmp_path / "refldm.ckpt")
    torch.save({"state_dict": {**vstate, "loss.discriminator.w": torch.ones(2)}}, tmp_path / "vqgan.ckpt")
    return live, ema, vstate


@pytest.mark.parametrize("with_ema", [True, False])
def test_convert_release_loads_for_restore(tmp_path, with_ema):
    from refface.train.refldm.restore import load_refldm

    ucfg, vcfg = small_cfgs()
    live, ema, vstate = _release(tmp_path, ucfg, vcfg, with_ema)
    summary = official.convert_release(
        tmp_path / "refldm.ckpt", tmp_path / "model", tmp_path / "vqgan.ckpt", attention_head_dim=16,
        resolution=32,
    )  # fmt: skip
    assert summary["unet_weights"] == ("ema" if with_ema else "model")
    unet, vq, cfg = load_refldm(tmp_path / "model")
    assert cfg.task.ref_encoding == "joint" and cfg.task.sampling_preset == "official"
    assert cfg.unet.attention_levels == [False, True] and cfg.vqgan.block_out_channels == [32, 32, 64]
    expected = ema if with_ema else live
    back = official_keys.to_official(unet.state_dict(), official_keys.unet_rules(cfg.unet), "unet")
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    vback = official_keys.to_official(vq.state_dict(), official_keys.vqgan_rules(cfg.vqgan), "vqgan")
    assert all(torch.equal(vback[k], vstate[k]) for k in vstate)


def test_convert_release_reads_first_stage_and_reports(tmp_path):
    ucfg, vcfg = small_cfgs()
    _, _, vstate = _release(tmp_path, ucfg, vcfg, with_ema=True)
    ck = torch.load(tmp_path / "refldm.ckpt")
    ck["state_dict"] |= {official.FIRST_STAGE_PREFIX + k: v for k, v in vstate.items()}
    torch.save(ck, tmp_path / "refldm.ckpt")
    info = official.inspect_release(tmp_path / "refldm.ckpt")
    assert info["ema_present"] and info["prefixes"]["first_stage_model"] == len(vstate)
    assert info["unet"]["channel_mult"] == [1, 2]
    summary = official.convert_release(
        tmp_path / "refldm.ckpt", tmp_path / "m", attention_head_dim=16, resolution=32
    )
    assert "first_stage_model" in summary["vqgan_from"]


def _write_faces(folder: Path, names: list[str], seed: int, size: int = 32) -> None:
    from refface.manifests.io import write_png

    for i, name in enumerate(names):
        rng = np.random.default_rng(seed + i)
        write_png(folder / name, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_converted_folder_restores_with_the_official_preset(tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app
    from refface.manifests.io import read_image
    from refface.train.refldm.restore import restore_folder

    ucfg, vcfg = small_cfgs()
    _release(tmp_path, ucfg, vcfg, with_ema=True)
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["convert", "refldm-official", "--ckpt", str(tmp_path / "refldm.ckpt"), "--vqgan",
         str(tmp_path / "vqgan.ckpt"), "--inspect"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["ema_present"] and info["vqgan_loss_tensors"] == 1
    res = runner.invoke(
        app,
        ["convert", "refldm-official", "--ckpt", str(tmp_path / "refldm.ckpt"), "--vqgan",
         str(tmp_path / "vqgan.ckpt"), "--out", str(tmp_path / "model"), "--attention-head-dim", "16",
         "--resolution", "32"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lq, refs = tmp_path / "lq", tmp_path / "refs"
    (lq).mkdir()
    _write_faces(lq, ["a.png"], 0)
    _write_faces(lq, ["b.png"], 0)  # the same LQ image under another name
    for stem in ("a", "b"):
        (refs / stem).mkdir(parents=True)
        _write_faces(refs / stem, ["r0.png", "r1.png"], 10)
    counts = restore_folder(lq, tmp_path / "out", checkpoint=tmp_path / "model", references=refs, steps=2)
    assert counts["restored"] == 2
    a, b = read_image(tmp_path / "out" / "a.png"), read_image(tmp_path / "out" / "b.png")
    # The official preset starts every image from the seed's single draw: same inputs, same output.
    assert np.array_equal(a, b)
    counts = restore_folder(
        lq, tmp_path / "out2", checkpoint=tmp_path / "model", references=refs, steps=2, preset="refface"
    )
    assert counts["restored"] == 2
    # refface's preset draws per image key, so the two copies differ.
    assert not np.array_equal(
        read_image(tmp_path / "out2" / "a.png"), read_image(tmp_path / "out2" / "b.png")
    )


def test_train_init_reads_a_converted_folder(tmp_path):
    import dataclasses

    from refface.train.refldm.config import load_config
    from refface.train.refldm.tasks import build_task
    from refface.train.refldm.train import apply_init

    ucfg, vcfg = small_cfgs()
    _release(tmp_path, ucfg, vcfg, with_ema=False)
    official.convert_release(
        tmp_path / "refldm.ckpt",
        tmp_path / "model",
        tmp_path / "vqgan.ckpt",
        attention_head_dim=16,
        resolution=32,
    )
    cfg, _ = load_config(Path(__file__).parents[1] / "configs" / "refldm_tiny.yaml")
    task_cfg = dataclasses.replace(cfg.task, stage="refldm", identity_weight=0.0)
    cfg = apply_init(dataclasses.replace(cfg, task=task_cfg), tmp_path / "model")
    assert cfg.unet.base_channels == 32 and cfg.task.ref_encoding == "joint"
    task = build_task(cfg, tmp_path / "run" / "refldm")
    converted = RefLDMUNet.from_pretrained(tmp_path / "model" / "unet")
    ours, theirs = task.unet.state_dict(), converted.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_convert_checks_the_stored_noise_schedule(tmp_path):
    from refface.train.refldm.model import NoiseConfig, make_train_scheduler

    ucfg, vcfg = small_cfgs()
    _release(tmp_path, ucfg, vcfg, with_ema=False)
    ck = torch.load(tmp_path / "refldm.ckpt")
    good = make_train_scheduler(NoiseConfig()).betas
    ck["state_dict"]["betas"] = good.double()
    torch.save(ck, tmp_path / "refldm.ckpt")
    kw = {"attention_head_dim": 16, "resolution": 32}
    official.convert_release(tmp_path / "refldm.ckpt", tmp_path / "ok", tmp_path / "vqgan.ckpt", **kw)
    ck["state_dict"]["betas"] = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    torch.save(ck, tmp_path / "refldm.ckpt")
    with pytest.raises(ValueError, match="noise schedule"):
        official.convert_release(tmp_path / "refldm.ckpt", tmp_path / "bad", tmp_path / "vqgan.ckpt", **kw)
