"""A tiny random Stable Diffusion (UNet, VAE, CLIP text encoder + tokenizer) built offline from configs.

Used by the tests, the CPU benchmark and `refface demo`; real runs point `--sd` at a real diffusers folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from refface.mining.tiny_clip import write_tokenizer

# Small enough for CPU tests: 32x32 images, a 2x VAE (16x16x4 latents), a 2-level UNet.
UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 32),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 32,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "projection_dim": 32,
}
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
IMAGE_SIZE = 32


def build_tiny_sd(seed: int = 0) -> dict:
    """Return ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler"}`` with random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp))
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD in the diffusers folder layout (what ``--sd`` points at)."""
    folder = Path(folder)
    parts = build_tiny_sd(seed)
    parts["unet"].save_pretrained(folder / "unet")
    parts["vae"].save_pretrained(folder / "vae")
    parts["text_encoder"].save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer")
    parts["scheduler"].save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    return folder
