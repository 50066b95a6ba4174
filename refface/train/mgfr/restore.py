"""MGFR inference: restore a folder of aligned LQ faces with a trained checkpoint and CFG guidance."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from refface.console import track
from refface.manifests.errors import ErrorsTable, ImageError
from refface.manifests.io import list_images, read_image, write_png
from refface.mining.attributes import FALLBACK_PROMPT
from refface.mining.detect import PrealignedDetector
from refface.mining.embed import check_embedding_dim, make_embedder
from refface.mining.tta import DEFAULT_TTA, check_tta
from refface.mining.vocabulary import prompts_from_text
from refface.seeding import item_seed
from refface.train.checkpoints import load_trainable_weights
from refface.train.mgfr.model import GuidanceConfig, MGFRAdapters, load_frozen_sd, sample
from refface.train.mgfr.task import resolve_checkpoint

logger = logging.getLogger(__name__)


def load_mgfr(checkpoint: str | Path, sd: str | Path, use_ema: bool = True, device: Any = None):
    """Load a trained MGFR: ``(frozen SD, adapters, MGFR config dict, checkpoint folder)``.

    The adapters' architecture comes from the checkpoint's ``state.json`` (not from flags).

    Args:
        checkpoint: a checkpoint folder or a stage's run folder (its latest checkpoint).
        sd: the local diffusers SD folder the checkpoint was trained on.
        use_ema: load the EMA weights when present.
        device: torch device (default: CUDA when available, else CPU).
    """
    import torch

    ckpt = resolve_checkpoint(checkpoint)
    meta = json.loads((ckpt / "state.json").read_text())
    task = meta.get("task") or {}
    if "adapters" not in task or "mgfr" not in task:
        raise ValueError(f"{ckpt} is not an MGFR checkpoint (state.json has no task.adapters / task.mgfr)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    frozen = load_frozen_sd(sd)
    adapters_cfg = {k: v for k, v in task["adapters"].items() if not k.startswith("_")}
    adapters = MGFRAdapters.from_config(adapters_cfg)
    kind = load_trainable_weights(ckpt, {"adapters": adapters}, use_ema=use_ema)
    logger.info("MGFR %s weights from %s", kind, ckpt)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for m in (frozen.unet, frozen.vae, frozen.text_encoder):
        # Cast only when needed: diffusers warns on every dtype cast, even to the dtype it has.
        if m.dtype == dtype:
            m.to(device)
        else:
            m.to(device, dtype=dtype)
    adapters.to(device).eval()
    return frozen, adapters, task["mgfr"], ckpt


def _to_tensor(img, size: int):
    import cv2
    import torch

    if img.shape[0] != size or img.shape[1] != size:
        interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_CUBIC
        img = cv2.resize(img, (size, size), interpolation=interp)
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0


def _find_reference(references: Path, rel: str) -> Path | None:
    exact = references / rel
    if exact.is_file():
        return exact
    matches = sorted(references.glob(f"{Path(rel).with_suffix('')}.*"))
    return matches[0] if matches else None


def read_prompt_table(path: str | Path) -> dict[str, tuple[str, str]]:
    """Per-image prompts from an attributes table (``attributes.parquet`` or a CSV).

    Rows are keyed by ``path`` (relative image path). A row gives ``prompt`` and
    ``negative_attribute_prompt`` directly, or typed attributes in an ``attributes`` column
    ("blue eyes, beard"), composed with the vocabulary.

    Returns:
        ``{path: (prompt, negative-attribute prompt)}``; each path also under its name without extension.
    """
    import pandas as pd

    path = Path(path)
    df = (
        pd.read_parquet(path)
        if path.suffix == ".parquet"
        else pd.read_csv(path, dtype=str, keep_default_na=False)
    )
    if "path" not in df.columns or not ({"prompt", "attributes"} & set(df.columns)):
        raise ValueError(
            f"{path}: an attributes table needs a path column and a prompt (with optional "
            "negative_attribute_prompt) or an attributes column"
        )

    def text(value) -> str:
        return "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()

    out: dict[str, tuple[str, str]] = {}
    for row in df.to_dict("records"):
        if text(row.get("attributes")):
            pair = prompts_from_text(text(row["attributes"]))
        else:
            pair = (text(row.get("prompt")), text(row.get("negative_attribute_prompt")))
        rel = str(row["path"])
        out[rel] = pair
        out.setdefault(str(Path(rel).with_suffix("")), pair)
    return out


def resolve_prompts(
    rels: list[str],
    prompt: str | None,
    negative_attribute_prompt: str,
    attributes: str | Path | None,
) -> tuple[list[tuple[str, str]], int]:
    """``(prompt, negative-attribute prompt)`` per image, and how many images the table lacked.

    ``attributes`` is a table file (per image, see :func:`read_prompt_table`) or typed attributes
    for every image ("blue eyes, beard"). A table row wins over ``prompt`` / ``negative_attribute_prompt``,
    which win over typed text's own composition only where given explicitly.
    """
    base = (prompt or FALLBACK_PROMPT, negative_attribute_prompt)
    table: dict[str, tuple[str, str]] = {}
    if attributes is not None and Path(str(attributes)).suffix in (".csv", ".parquet"):
        if not Path(attributes).is_file():
            raise FileNotFoundError(f"attributes table {attributes} not found")
        table = read_prompt_table(attributes)
    elif attributes is not None:
        typed, typed_negative = prompts_from_text(str(attributes))
        base = (prompt or typed, negative_attribute_prompt or typed_negative)
    pairs, missing = [], 0
    for rel in rels:
        row = table.get(rel) or table.get(str(Path(rel).with_suffix("")))
        if table and row is None:
            missing += 1
        # An empty cell falls back to the prompt every image gets.
        pairs.append((row[0] or base[0], row[1] or base[1]) if row is not None else base)
    return pairs, missing


def restore_folder(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    checkpoint: str | Path,
    sd: str | Path,
    references: str | Path | None = None,
    prompt: str | None = None,
    attributes: str | Path | None = None,
    steps: int = 50,
    w_quality: float = 1.5,
    w_attribute: float = 1.0,
    negative_attribute_prompt: str = "",
    embedder: str = "arcface",
    embedder_model: str | None = None,
    tta: str = DEFAULT_TTA,
    batch_size: int = 4,
    seed: int = 0,
    device: str | None = None,
    use_ema: bool = True,
) -> dict[str, int]:
    """Restore every image under ``input_dir`` (or the one image it names) into ``output_dir`` (same
    relative path, ``.png``).

    Inputs are FFHQ-aligned LQ faces. A stage-2 checkpoint also needs ``references``: a folder with an
    aligned reference of the same person under the same relative name (any image extension); its
    identity embedding comes from ``embedder`` on the prealigned face. Already restored outputs are kept
    (a rerun does only missing work); unreadable inputs or missing references land in
    ``<output_dir>/errors.csv``. Each image's noise comes from ``(seed, relative path)``.

    Args:
        input_dir: folder of LQ images.
        output_dir: where restored PNGs are written.
        checkpoint: MGFR checkpoint folder or stage run folder.
        sd: local diffusers Stable Diffusion folder used in training.
        references: folder of references (stage-2 checkpoints).
        prompt: attribute prompt for every image (default: the pipeline's neutral face prompt).
        attributes: per-image prompts from an attributes table (``.parquet`` / ``.csv``, see
            :func:`read_prompt_table`), or typed attributes for every image ("blue eyes, beard"), which
            also give the negative-attribute prompt (the other labels of the named groups).
        steps: DDIM steps.
        w_quality: negative-quality guidance weight.
        w_attribute: negative-attribute guidance weight.
        negative_attribute_prompt: attributes to steer away from ("" = unconditional) for every image
            without a table row.
        embedder: ``arcface`` or ``dlib`` (must match the training embeddings' size).
        embedder_model: path of the embedder's weights (ArcFace ONNX).
        tta: the embedder's test-time augmentation, as the training set was mined (``flip``, the
            mining default, or ``none``).
        batch_size: images per sampling batch.
        seed: base seed.
        device: torch device string.
        use_ema: use the EMA weights.

    Returns:
        Counts ``{"restored", "skipped", "errors"}``, plus ``"without attributes"`` when a table
        lacked some inputs (they get ``prompt`` / the default prompt).
    """
    import numpy as np
    import torch

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_tta(tta)
    guidance = GuidanceConfig(
        steps=steps,
        w_quality=w_quality,
        w_attribute=w_attribute,
        negative_attribute_prompt=negative_attribute_prompt,
    )
    frozen, adapters, cfg, ckpt = load_mgfr(checkpoint, sd, use_ema=use_ema, device=device)
    stage2 = int(cfg["stage"]) == 2
    if stage2 and references is None:
        raise ValueError(f"{ckpt} is a stage-2 checkpoint: pass --references (aligned reference per input)")
    ref_root = Path(references) if stage2 and references is not None else None
    size = int(cfg["resolution"])
    dev = frozen.unet.device
    dtype = frozen.unet.dtype

    embed = None
    if stage2:
        emb_model = make_embedder(embedder, embedder_model, tta=tta)
        check_embedding_dim(
            emb_model.dim,
            f"--embedder {embedder}",
            cfg["id_dim"],
            f"the checkpoint {ckpt}",
            "use the embedder the training data was embedded with (--embedder arcface: 512, dlib: 128)",
        )
        detector = PrealignedDetector()

        def embed(img):
            face = detector(img)[0]
            vec, _ = emb_model.embed_crops([emb_model.crop(img, face)])
            return torch.from_numpy(vec[0])

    errors = ErrorsTable()
    if input_dir.is_file():
        input_dir, rels = input_dir.parent, [input_dir.name]
    else:
        rels = list_images(input_dir)
    pairs, without = resolve_prompts(rels, prompt, negative_attribute_prompt, attributes)
    prompt_of = dict(zip(rels, pairs, strict=True))
    todo = []
    skipped = 0
    for rel in rels:
        out = output_dir / Path(rel).with_suffix(".png")
        if out.is_file():
            skipped += 1
            continue
        todo.append((rel, out))

    restored = 0
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for chunk in track(batches, "restoring (MGFR)", total=len(batches)):
        items = []
        refs: list[torch.Tensor] = []  # stage 2: one reference and its embedding per item
        embs: list[torch.Tensor] = []
        for rel, out in chunk:
            try:
                lq = _to_tensor(read_image(input_dir / rel), size)
                if ref_root is not None:
                    ref_path = _find_reference(ref_root, rel)
                    if ref_path is None:
                        raise ImageError(f"no reference named like {rel} under {references}")
                    ref_img = read_image(ref_path)
                    ref, emb = _to_tensor(ref_img, size), embed(ref_img)
                    refs.append(ref)
                    embs.append(emb)
                items.append((rel, out, lq))
            except ImageError as exc:
                errors.add(rel, "restore", str(exc))
        if not items:
            continue
        # Per-image generators: an image's noise depends on (seed, path), not on batch or order.
        gens = [
            torch.Generator(device=dev).manual_seed(item_seed(seed, it[0]) & ((1 << 63) - 1)) for it in items
        ]
        with torch.no_grad():
            imgs = sample(
                frozen,
                adapters,
                torch.stack([it[2] for it in items]).to(dev, dtype),
                [prompt_of[it[0]][0] for it in items],
                guidance,
                gens,
                ref=torch.stack(refs).to(dev, dtype) if stage2 else None,
                id_embedding=torch.stack(embs).to(dev, torch.float32) if stage2 else None,
                negative_attribute_prompts=[prompt_of[it[0]][1] for it in items],
            )
        for (_rel, out, *_), img in zip(items, imgs, strict=True):
            arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            write_png(out, np.ascontiguousarray(arr))
            restored += 1
    if len(errors):
        errors.write(output_dir)
    counts = {"restored": restored, "skipped": skipped, "errors": len(errors)}
    if without:
        logger.warning("%d inputs have no row in %s: they get the default prompt", without, attributes)
        counts["without attributes"] = without
    return counts
