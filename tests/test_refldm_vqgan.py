"""Stage A losses: each network gets only its own adversarial gradients; the GAN starts at disc_start."""

from __future__ import annotations

import pytest
import torch
from common.tiny_refldm import _one_thread  # noqa: F401  (autouse fixture)

from refface.train.refldm.vqgan import PatchDiscriminator, VQGANConfig, build_vqgan, vqgan_losses


def tiny():
    cfg = VQGANConfig(
        block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, num_vq_embeddings=16,
        norm_num_groups=4, perceptual_weight=0.0, disc_start=3, disc_channels=8, disc_layers=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return cfg, build_vqgan(cfg), PatchDiscriminator(cfg.disc_channels, cfg.disc_layers)


def grads(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_adversarial_terms_reach_only_their_own_network():
    cfg, vq, disc = tiny()
    gt = torch.rand(2, 3, 32, 32) * 2 - 1
    parts = vqgan_losses(vq, disc, None, gt, step=5, cfg=cfg)
    parts["g_adv"].backward(retain_graph=True)
    assert grads(vq) > 0 and grads(disc) == 0
    vq.zero_grad()
    parts["d_hinge"].backward()
    assert grads(disc) > 0 and grads(vq) == 0


def test_gan_is_off_before_disc_start():
    cfg, vq, disc = tiny()
    gt = torch.rand(2, 3, 32, 32) * 2 - 1
    before = vqgan_losses(vq, disc, None, gt, step=2, cfg=cfg)
    after = vqgan_losses(vq, disc, None, gt, step=3, cfg=cfg)
    plain = cfg.l1_weight * before["l1"] + cfg.codebook_weight * before["codebook"]
    torch.testing.assert_close(before["loss"], plain)
    assert float(after["loss"].detach()) != pytest.approx(float(plain.detach()))
    # The latent is f = 2 here and 8 channels in the paper config: 2 ** (levels - 1).
    assert cfg.factor == 2 and VQGANConfig().factor == 8


def test_adaptive_adversarial_weight_is_taming_s_gradient_ratio():
    import dataclasses

    from refface.train.refldm.vqgan import adaptive_disc_weight

    cfg, vq, disc = tiny()
    cfg = dataclasses.replace(cfg, disc_weight=0.8, adaptive_disc_weight=True)
    gt = torch.rand(2, 3, 32, 32) * 2 - 1
    before = vqgan_losses(vq, disc, None, gt, step=0, cfg=cfg)
    assert float(before["disc_weight"]) == pytest.approx(0.8)  # not computed before the start step
    after = vqgan_losses(vq, disc, None, gt, step=cfg.disc_start, cfg=cfg)
    last = vq.decoder.conv_out.weight
    g_rec = torch.autograd.grad(after["l1"], last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(after["g_adv"], last, retain_graph=True)[0]
    expected = min(max(float(g_rec.norm() / (g_adv.norm() + 1e-4)), 0.0), 1e4) * 0.8
    assert float(after["disc_weight"]) == pytest.approx(expected, rel=1e-5)
    assert float(adaptive_disc_weight(vq, after["l1"], after["g_adv"], 1.0)) == pytest.approx(
        expected / 0.8, rel=1e-5
    )
    after["loss"].backward()  # the graph is still usable after the weight's gradient probes
