"""Zero-shot CLIP attribute scorer: the probability of each vocabulary label on aligned face crops.

For every group of :data:`refface.mining.vocabulary.VOCABULARY`, the face's image embedding is
compared with the text embedding of each label's query sentence; the softmax of the scaled cosine
similarities over the group's labels is that group's probabilities. Weights come from a local
transformers CLIP folder (``CLIPModel.save_pretrained`` layout plus its tokenizer); nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refface.mining.vocabulary import VOCABULARY, AttributeGroup

# OpenAI CLIP's pixel statistics, used when the folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def check_clip_folder(folder: str | os.PathLike | None) -> Path:
    """The CLIP folder, or ``FileNotFoundError`` naming what is missing and what to put there."""
    hint = (
        "a local transformers CLIP folder (config.json, model.safetensors or pytorch_model.bin, "
        "vocab.json, merges.txt), e.g. openai/clip-vit-large-patch14 saved with save_pretrained; "
        "nothing is downloaded"
    )
    if folder is None:
        raise FileNotFoundError(f"the clip attribute backend needs --clip-model: {hint}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP folder {folder} does not exist; pass {hint}")
    missing = [f for f in ("config.json", *TOKENIZER_FILES) if not (folder / f).is_file()]
    if not any((folder / w).is_file() for w in CLIP_WEIGHTS):
        missing.append(" or ".join(CLIP_WEIGHTS))
    if missing:
        raise FileNotFoundError(f"CLIP folder {folder} lacks {', '.join(missing)}; it must be {hint}")
    return folder


class ClipAttributeAnalyzer:
    """Scores aligned RGB crops against the vocabulary; returns ``[{"groups": {group: {label: p}}}]``."""

    def __init__(
        self,
        model_dir: str | os.PathLike | None,
        vocabulary: Sequence[AttributeGroup] = VOCABULARY,
        device: str = "cpu",
    ):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        folder = check_clip_folder(model_dir)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        self.device = device
        self.vocabulary = tuple(vocabulary)
        self.size = int(self.model.config.vision_config.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        queries = [lab.query for g in self.vocabulary for lab in g.labels]
        max_len = min(
            int(self.tokenizer.model_max_length), self.model.config.text_config.max_position_embeddings
        )
        tokens = self.tokenizer(
            queries, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        with torch.no_grad():
            text = self.model.get_text_features(**{k: v.to(device) for k, v in tokens.items()})
        self.text = torch.nn.functional.normalize(_features(text), dim=-1)
        self.scale = float(self.model.logit_scale.detach().exp())

    def pixels(self, crops: Sequence[np.ndarray]):
        """(B, 3, S, S) normalized CLIP input from uint8 RGB aligned crops (whole crop, resized)."""
        import cv2
        import torch

        out = []
        for c in crops:
            interp = cv2.INTER_AREA if c.shape[0] > self.size else cv2.INTER_CUBIC
            img = cv2.resize(c, (self.size, self.size), interpolation=interp).astype(np.float32) / 255.0
            out.append((img - self.mean) / self.std)
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()

    def __call__(self, crops: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        import torch

        with torch.no_grad():
            image = self.model.get_image_features(pixel_values=self.pixels(crops).to(self.device))
            image = torch.nn.functional.normalize(_features(image), dim=-1)
            logits = (self.scale * image @ self.text.T).float().cpu().numpy()
        results = []
        for row in logits:
            groups, start = {}, 0
            for g in self.vocabulary:
                part = row[start : start + len(g.labels)]
                start += len(g.labels)
                p = np.exp(part - part.max())
                p /= p.sum()
                groups[g.name] = {lab.name: float(v) for lab, v in zip(g.labels, p, strict=True)}
            results.append({"groups": groups})
        return results


def _features(out):
    """transformers returns a tensor, or (newer releases) an output object holding the pooled features."""
    if hasattr(out, "pooler_output"):
        return out.pooler_output
    return out
