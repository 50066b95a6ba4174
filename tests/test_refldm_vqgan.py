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
