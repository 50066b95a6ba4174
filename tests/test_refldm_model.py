"""ReF-LDM denoiser: CacheKV equivalences, attention token counts, cached sampling, identity loss."""

from __future__ import annotations

import pytest
import torch
from common.tiny_refldm import _one_thread  # noqa: F401  (autouse fixture)

from refface.train.refldm.identity import identity_loss, iresnet
from refface.train.refldm.model import RefLDMUNet
from refface.train.refldm.sampling import ddim_sample


def tiny_unet(seed: int = 0) -> RefLDMUNet:
    torch.manual_seed(seed)
    return RefLDMUNet(
        latent_channels=4,
        sample_size=8,
        base_channels=16,
        channel_mult=(1, 2),
        layers_per_block=1,
        attention_levels=(True, True),
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def latents(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_zero_references_equal_plain_ldm():
    unet = tiny_unet()
    x, lq, t = latents(2, 4, 8, 8, seed=1), latents(2, 4, 8, 8, seed=2), torch.tensor([10, 500])
    with torch.no_grad():
        plain = unet(x, lq, t)
        empty = unet(x, lq, t, ref_latents=torch.zeros(2, 0, 4, 8, 8))
        refs = latents(2, 3, 4, 8, 8, seed=3)
        masked = unet(x, lq, t, ref_latents=refs, ref_mask=torch.zeros(2, 3, dtype=torch.bool))
        with_refs = unet(x, lq, t, ref_latents=refs)
    torch.testing.assert_close(empty, plain, rtol=0, atol=0)
    # All references masked out: the target attends to its own tokens only.
    torch.testing.assert_close(masked, plain, rtol=1e-5, atol=1e-6)
    # Real references do change the prediction (the cache is actually read).
    assert (with_refs - plain).abs().max() > 1e-4


def test_attention_sees_target_and_reference_tokens():
    unet = tiny_unet()
    k = 3
    unet.cachekv.record_tokens = {}
    with torch.no_grad():
        unet(
            latents(2, 4, 8, 8), latents(2, 4, 8, 8), torch.tensor([5, 5]), ref_latents=latents(2, k, 4, 8, 8)
        )
    seen = unet.cachekv.record_tokens
    # Every self-attention layer (down, mid, up) has a CacheKV processor and saw (1 + K) x its own tokens.
    assert set(seen) == set(unet.cachekv_layers) and len(seen) >= 3
    own = {
        "unet.down_blocks.0": 64,
        "unet.down_blocks.1": 16,
        "unet.mid_block": 16,
        "unet.up_blocks.0": 16,
        "unet.up_blocks.1": 64,
    }
    for name, tokens in seen.items():
        expected = next(v for p, v in own.items() if name.startswith(p))
        assert tokens == (1 + k) * expected, name
    cache = unet.build_cache(latents(2, k, 4, 8, 8))
    key, value = cache.kv[unet.cachekv_layers[0]]
    assert key.shape == (2, 2, k * 64, 8) and value.shape == key.shape  # (B, heads, K*T, d)


def test_partial_reference_mask_equals_dropping_that_reference():
    unet = tiny_unet()
    x, lq, t = latents(1, 4, 8, 8), latents(1, 4, 8, 8, seed=5), torch.tensor([300])
    refs = latents(1, 2, 4, 8, 8, seed=6)
    with torch.no_grad():
        masked = unet(x, lq, t, ref_latents=refs, ref_mask=torch.tensor([[True, False]]))
        single = unet(x, lq, t, ref_latents=refs[:, :1])
    torch.testing.assert_close(masked, single, rtol=1e-5, atol=1e-6)


def test_cached_sampling_equals_recomputing_every_step():
    unet = tiny_unet()
    lq, refs = latents(2, 4, 8, 8, seed=7), latents(2, 2, 4, 8, 8, seed=8)
    mask = torch.tensor([[True, True], [True, False]])
    runs = []
    for rebuild in (False, True):
        g = torch.Generator().manual_seed(123)
        runs.append(ddim_sample(unet, lq, refs, mask, steps=5, generator=g, rebuild_cache_every_step=rebuild))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert torch.isfinite(runs[0]).all()
    # CFG scale matters: guidance 1.0 (no null branch) differs from 1.5.
    g = torch.Generator().manual_seed(123)
    no_cfg = ddim_sample(unet, lq, refs, mask, steps=5, generator=g, guidance_scale=1.0)
    assert (no_cfg - runs[0]).abs().max() > 1e-5


def test_identity_loss_scales_with_sqrt_alpha_bar_and_reaches_unet():
    torch.manual_seed(0)
    arcface = iresnet("r18", widths=(4, 8, 8, 8)).eval().requires_grad_(False)
    unet = tiny_unet().train()
    decoder = torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.Tanh()
    )
    x0 = latents(2, 4, 8, 8, seed=9)
    target = decoder(latents(2, 4, 8, 8, seed=10)).detach()
    from refface.train.refldm.model import NoiseConfig, make_train_scheduler

    sched = make_train_scheduler(NoiseConfig())
    acp = sched.alphas_cumprod
    eps = latents(2, 4, 8, 8, seed=11)
    losses = {}
    for t in (50, 800):
        ts = torch.tensor([t, t])
        a = acp[ts].view(-1, 1, 1, 1)
        zt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        unet.zero_grad()
        eps_hat = unet(zt, torch.zeros_like(zt), ts)
        x0_hat = (zt - (1 - a).sqrt() * eps_hat) / a.sqrt()
        per_sample = identity_loss(arcface, decoder(x0_hat), target, acp[ts])
        per_sample.mean().backward()
        grads = [p.grad for p in unet.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0
        unscaled = identity_loss(arcface, decoder(x0_hat.detach()), target, torch.ones(2))
        losses[t] = (per_sample.detach(), unscaled.detach())
    for t, (scaled, unscaled) in losses.items():
        torch.testing.assert_close(scaled, unscaled * acp[t].sqrt().float(), rtol=1e-5, atol=1e-7)
    assert acp[800] < acp[50]


def test_identity_loss_is_zero_for_identical_images():
    torch.manual_seed(0)
    arcface = iresnet("r18", widths=(4, 8, 8, 8)).eval()
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    loss = identity_loss(arcface, img, img, torch.ones(2))
    torch.testing.assert_close(loss, torch.zeros(2), atol=1e-6, rtol=0)


def test_gradient_checkpointing_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="CacheKV"):
        tiny_unet().enable_gradient_checkpointing()


def test_identity_crop_resize_is_the_official_area_resize():
    import torch.nn.functional as F

    from refface.train.refldm.identity import arcface_input

    x = torch.rand(2, 3, 64, 64) * 2 - 1
    official = F.interpolate(x[:, :, 4:60, 4:60], (112, 112), mode="area")
    assert torch.equal(arcface_input(x), official)
    assert not torch.equal(arcface_input(x, resize="bilinear"), official)
