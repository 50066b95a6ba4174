"""A tiny random transformers CLIP saved in the folder layout the clip attribute backend loads.

Used by the tests and `refface demo` (its scores mean nothing); real runs pass --clip-model a real CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_LENGTH = 64


def _byte_chars() -> list[str]:
    # The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for raw bytes.
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: str | Path, max_length: int = 16) -> Path:
    """Write a character-level CLIP tokenizer (vocab.json, merges.txt, configs) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    return folder


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """config.json + model.safetensors + a character-level CLIP tokenizer + preprocessor_config.json."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    write_tokenizer(folder, max_length=MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "crop_size": 32})
    )
    return folder
