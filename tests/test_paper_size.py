"""The papers' model sizes on the CPU: ReF-LDM at configs/refldm.yaml and MGFR on a Stable-Diffusion-1.5-
sized UNet, random weights built from configs; exact parameter counts and one forward at batch 1."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from refface.train import paper_size  # noqa: E402

pytestmark = pytest.mark.slow
# The parameters are the papers'; the spatial size is free in these convolutional networks, so one
# forward runs at a quarter of the pixels (256 px images, 32x32 latents) to keep the CPU test short.
# bench/gpu_check.py runs the papers' 512 px / 64x64 at their batch sizes.
IMAGE, LATENT = 256, 32


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores shared by everything else on the machine: keep this test from taking all of them.
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def test_refldm_paper_size_counts_and_forward():
    from refface.train.refldm.vqgan import decode, encode

    torch.manual_seed(0)
    unet, vq = paper_size.build_refldm()
    # The released ReF-LDM checkpoints' sizes.
    assert paper_size.count_parameters(unet) == paper_size.REFLDM_UNET_PARAMS == 117_759_368
    assert paper_size.count_parameters(vq) == paper_size.REFLDM_VQGAN_PARAMS == 57_183_515
    unet.eval()
    vq.eval()
    with torch.no_grad():
        image = torch.rand(1, 3, IMAGE, IMAGE) * 2 - 1
        latent = encode(vq, image)
        assert latent.shape == (1, 8, LATENT, LATENT)  # f = 8
        refs = torch.randn(1, 5, 8, LATENT, LATENT)  # the paper trains with 5 references
        noise = torch.randn_like(latent)
        eps = unet(noise, latent, torch.tensor([500]), ref_latents=refs)
        assert eps.shape == (1, 8, LATENT, LATENT) and torch.isfinite(eps).all()
        # The references reach the target through CacheKV: other references, another prediction.
        other = unet(noise, latent, torch.tensor([500]), ref_latents=refs.flip(1) * 0.5)
        assert not torch.allclose(other, eps)
        out = decode(vq, latent)
        assert out.shape == (1, 3, IMAGE, IMAGE) and torch.isfinite(out).all()


def test_sd15_component_sizes():
    # Counted on the meta device: the sizes without the memory.
    with torch.device("meta"):
        assert paper_size.count_parameters(paper_size.build_sd15_unet()) == paper_size.SD15_UNET_PARAMS
        assert paper_size.count_parameters(paper_size.build_sd15_vae()) == paper_size.SD15_VAE_PARAMS
        assert (
            paper_size.count_parameters(paper_size.build_sd15_text_encoder()) == paper_size.SD15_TEXT_PARAMS
        )


def test_mgfr_adapters_are_controlnet_sized_on_sd15():
    """Each MGFR branch (LCA, RCA) is a ControlNet encoder copy of the SD-1.5 UNet, minus ControlNet's
    image-condition embedding (MGFR feeds latents instead); stage 2 adds the fusion parts."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        unet = paper_size.build_sd15_unet()
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        branch = paper_size.count_parameters(controlnet) - paper_size.count_parameters(
            controlnet.controlnet_cond_embedding
        )
        stage1 = paper_size.build_mgfr_adapters(unet, stage=1)
        stage2 = paper_size.build_mgfr_adapters(unet, stage=2)
    assert paper_size.count_parameters(stage1) == branch == 360_192_640
    assert paper_size.count_parameters(stage2.rca) == branch
    extra = sum(paper_size.count_parameters(getattr(stage2, n)) for n in ("rlf", "id_tokens", "r2l", "l2r"))
    assert paper_size.count_parameters(stage2) == 2 * branch + extra


def test_mgfr_stage2_forward_on_sd15_sized_unet():
    """One stage-2 forward (LCA + RCA residuals into the frozen UNet) at batch 1, in bf16 (3.3 GB of
    weights instead of 6.6 GB in fp32)."""
    from types import SimpleNamespace

    from refface.train.mgfr.model import predict

    unet = paper_size.build_sd15_unet_fast(dtype=torch.bfloat16).eval()
    adapters = paper_size.build_mgfr_adapters(unet, stage=2, fast=True).eval()
    assert paper_size.count_parameters(unet) == paper_size.SD15_UNET_PARAMS
    assert all(p.dtype == torch.bfloat16 for p in adapters.parameters())
    # The adapters start from the UNet's encoder (ControlNet's initialisation).
    assert torch.equal(adapters.rca.conv_in.weight, unet.conv_in.weight)
    sd = SimpleNamespace(unet=unet)
    z = torch.randn(1, 4, LATENT, LATENT)
    with torch.no_grad():
        eps = predict(
            sd,
            adapters,
            noisy_latents=z,
            timesteps=torch.tensor([400]),
            text_embeds=torch.randn(1, 77, 768),
            lq_latents=torch.randn(1, 4, LATENT, LATENT),
            ref_latents=torch.randn(1, 4, LATENT, LATENT),
            id_embedding=torch.randn(1, 512),
        )
    assert eps.shape == (1, 4, LATENT, LATENT) and torch.isfinite(eps.float()).all()
