"""Sampling transforms: a raw sample (target, references, embeddings, attributes) -> a training sample
of tensors for ReF-LDM or MGFR, with LQ made on the fly. Every random choice comes from a generator
seeded by ``(seed, epoch, key)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from refface.degradations import make_degrader
from refface.mining.attributes import FALLBACK_PROMPT, NEGATIVE_QUALITY_PROMPT
from refface.mining.embed import check_embedding_dim
from refface.seeding import item_seed
from refface.train.augment import RefAugment, augment_reference, fill_references, resize_square, to_tensor

TRAIN_PRESET = "refldm-train"


DEFAULT_EMBEDDING_DIM = 512


class LazyDegrader:
    """The CPU degrader, built lazily in each worker (it is not needed in the main process)."""

    def __init__(self, preset: str, seed: int, size: int):
        self.preset = preset
        self.seed = seed
        self.size = size
        self._degrader: Any = None

    def __call__(self, img: np.ndarray, key: str) -> np.ndarray:
        if self._degrader is None:
            self._degrader = make_degrader(self.preset, self.seed, out_size=self.size)
        lq, _params = self._degrader.degrade(img, key)
        return lq

    def __getstate__(self):
        return {**self.__dict__, "_degrader": None}


@dataclass
class SamplingConfig:
    """Shared settings of both sampling transforms."""

    resolution: int = 512
    seed: int = 0
    epoch: int = 0
    train: bool = True
    preset: str = TRAIN_PRESET
    augment: RefAugment = RefAugment()


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.degrade = LazyDegrader(config.preset, config.seed, config.resolution)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A training sample (the batch contract of the model) from a raw sample."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentation, LQ and negative-quality choice from now on."""
        self.config.epoch = int(epoch)

    def rng(self, key: str) -> np.random.Generator:
        return np.random.default_rng(item_seed(self.config.seed, f"{self.config.epoch}\0{key}"))

    def degrade_key(self, key: str, tag: str = "lq") -> str:
        # Epoch in the key: a new LQ every epoch, the same one after a resume.
        return f"{self.config.epoch}/{key}/{tag}"

    def gt_and_lq(
        self, raw: dict[str, Any], rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray]:
        res = self.config.resolution
        gt = resize_square(raw["hq"], res)
        flip = rng is not None and rng.random() < 0.5
        if raw.get("lq") is not None and not self.config.train:
            lq = resize_square(raw["lq"], res)
        else:
            lq = None
        if flip:
            gt = np.ascontiguousarray(gt[:, ::-1])
        if lq is None:
            lq = self.degrade(gt, self.degrade_key(raw["key"]))
        return gt, lq

    def reference(self, img: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        ref = resize_square(img, self.config.resolution)
        return augment_reference(ref, rng, self.config.augment) if rng is not None else ref


class RefLDMSampler(Sampler):
    """ReF-LDM sampling: ``num_refs`` references (repeat to fill, shuffled), reference augmentation,
    whole-sample horizontal flip, LQ from the target with the training preset."""

    def __init__(self, config: SamplingConfig, num_refs: int = 5):
        super().__init__(config)
        self.num_refs = num_refs

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        import torch

        rng = self.rng(raw["key"]) if self.config.train else None
        gt, lq = self.gt_and_lq(raw, rng)
        res = self.config.resolution
        slots = fill_references(len(raw["refs"]), self.num_refs, rng)
        refs = torch.empty(self.num_refs, 3, res, res)
        mask = torch.zeros(self.num_refs, dtype=torch.bool)
        for j, i in enumerate(slots):
            to_tensor(self.reference(raw["refs"][i], rng), out=refs[j])
            mask[j] = True
        refs[len(slots) :] = 0.0  # empty slots (no references at all) are zero images, masked out
        return {"gt": to_tensor(gt), "lq": to_tensor(lq), "refs": refs, "ref_mask": mask, "key": raw["key"]}


class MGFRSampler(Sampler):
    """MGFR sampling: one reference, the identity embedding of that reference, the attribute prompt.

    Negative samples (their target degraded with the training preset): a ``negative_quality_fraction``
    of samples get the negative-quality prompt, a ``negative_attribute_fraction`` the sample's
    negative-attribute prompt (attributes the face does not have). One uniform draw per sample and
    epoch decides, from its own generator, so the shares hold whatever the other draws are. A sample
    drawn for a negative-attribute prompt that has none stays a positive sample (``attrs_missing``
    counts them in the batch logs).

    The identity embedding is the reference's (what the identity extractor sees at inference), else
    the target's, else zeros. A sample without references gets a zero reference and zero embedding.
    """

    def __init__(
        self,
        config: SamplingConfig,
        negative_quality_fraction: float = 0.1,
        embedding_dim: int | None = None,
        negative_attribute_fraction: float = 0.0,
    ):
        super().__init__(config)
        shares = (negative_quality_fraction, negative_attribute_fraction)
        if min(shares) < 0.0 or sum(shares) > 1.0:
            raise ValueError(
                "negative_quality_fraction and negative_attribute_fraction must be >= 0 and sum to at most 1"
            )
        self.negative_quality_fraction = negative_quality_fraction
        self.negative_attribute_fraction = negative_attribute_fraction
        self.embedding_dim = embedding_dim

    def negative_kind(self, key: str) -> str | None:
        """``"quality"``, ``"attribute"`` or None (a positive sample) for ``key`` in this epoch."""
        if not self.config.train:
            return None
        u = np.random.default_rng(item_seed(self.config.seed, f"{self.config.epoch}\0{key}\0negq")).random()
        if u < self.negative_quality_fraction:
            return "quality"
        if u < self.negative_quality_fraction + self.negative_attribute_fraction:
            return "attribute"
        return None

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        import torch

        rng = self.rng(raw["key"]) if self.config.train else None
        gt, lq = self.gt_and_lq(raw, rng)
        res = self.config.resolution
        n = len(raw["refs"])
        if n:
            i = int(rng.integers(n)) if rng is not None else 0
            ref = to_tensor(self.reference(raw["refs"][i], rng))
        else:
            i = -1
            ref = torch.zeros(3, res, res)
        emb = None
        if i >= 0 and raw.get("ref_embeddings") is not None:
            emb = raw["ref_embeddings"][i]
        elif raw.get("id_embedding") is not None:
            emb = raw["id_embedding"]
        dim = self.embedding_dim or (len(emb) if emb is not None else DEFAULT_EMBEDDING_DIM)
        if emb is not None:
            check_embedding_dim(
                len(emb),
                f"sample {raw['key']}",
                dim,
                "this input pipeline (embedding_dim)",
                "every sample of one dataset must carry embeddings of one model",
            )
        emb = np.zeros(dim, np.float32) if emb is None else np.asarray(emb, np.float32)
        attrs = raw.get("attrs") or {}
        prompt = attrs.get("prompt") or FALLBACK_PROMPT
        kind = self.negative_kind(raw["key"])
        missing = kind == "attribute" and not attrs.get("negative_attribute_prompt")
        if missing:
            kind = None
        if kind is not None:
            gt = self.degrade(gt, self.degrade_key(raw["key"], "negq"))
            if kind == "quality":
                prompt = attrs.get("negative_quality_prompt") or NEGATIVE_QUALITY_PROMPT
            else:
                prompt = attrs["negative_attribute_prompt"]
        return {
            "gt": to_tensor(gt),
            "lq": to_tensor(lq),
            "ref": ref,
            "id_embedding": torch.from_numpy(emb),
            "prompt": prompt,
            "negative_quality": torch.tensor(kind == "quality"),
            "negative_attribute": torch.tensor(kind == "attribute"),
            "attrs_missing": torch.tensor(missing),
            "key": raw["key"],
        }
