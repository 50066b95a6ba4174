"""MGFR on a tiny random Stable Diffusion: branch shapes, frozen parts, gradients, overfitting, exact
resume, stage 1 -> 2 continuity and the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from common.tiny_root import make_tiny_root

from refface.builders.shards import ShardsConfig, write_shards
from refface.train.mgfr.tiny_sd import IMAGE_SIZE, save_tiny_sd

ID_DIM = 128  # dlib's size (configs/mgfr_tiny.yaml): references can be embedded offline
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mgfr_tiny.yaml"


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_accelerate():
    # The tiny model is overhead-bound: one thread is several times faster than two on a busy box.
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def sd(sd_dir):
    from refface.train.mgfr.model import load_frozen_sd

    return load_frozen_sd(sd_dir)


def make_batch(n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = IMAGE_SIZE
    # Smooth images (low-frequency noise upsampled) look more like faces to a VAE than white noise.
    gt = torch.nn.functional.interpolate(
        torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, size=(s, s), mode="bilinear"
    )
    lq = torch.nn.functional.interpolate(gt[:, :, ::4, ::4], size=(s, s), mode="bilinear")
    ref = gt.flip(-1)
    emb = torch.nn.functional.normalize(torch.randn(n, ID_DIM, generator=g), dim=1)
    return {
        "gt": gt,
        "lq": lq,
        "ref": ref,
        "id_embedding": emb,
        "prompt": [f"a person number {i} with short hair" for i in range(n)],
        "negative_quality": torch.tensor([i % 2 == 1 for i in range(n)]),
        "key": [f"k{i}" for i in range(n)],
    }


def collate(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def make_loader(n: int = 4, batch_size: int = 2, seed: int = 0):
    b = make_batch(n, seed)
    items = [{k: v[i] for k, v in b.items()} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=True, collate_fn=collate)


def mgfr_cfg(stage: int, **kw):
    from refface.train.mgfr.config import MGFRConfig

    base = dict(
        stage=stage, resolution=IMAGE_SIZE, batch_size=2, num_workers=0, id_dim=ID_DIM, num_id_tokens=2
    )
    base.update(rlf_channels=32, prompt_dropout=0.0, validation_steps=2, validation_samples=2)
    base.update(kw)
    return MGFRConfig(**base)


def loop_cfg(out, **kw):
    from refface.train.loop_config import LoopConfig

    base = dict(output_dir=str(out), max_steps=4, learning_rate=1e-4, ema_decay=0.99, checkpoint_every=2)
    base.update(validate_every=0, log_every=1, report_to="none")
    base.update(kw)
    return LoopConfig(**base)


def fresh_sd(sd_dir):
    from refface.train.mgfr.model import load_frozen_sd

    return load_frozen_sd(sd_dir)


def test_shapes_through_every_branch(sd):
    from refface.train.mgfr.model import MGFRAdapters, encode_images, encode_prompts, predict

    a = MGFRAdapters.from_unet(sd.unet, use_rca=True, id_dim=ID_DIM, num_id_tokens=2, rlf_channels=32)
    b = make_batch(2)
    z = encode_images(sd, b["gt"])
    z_lq, z_ref = encode_images(sd, b["lq"]), encode_images(sd, b["ref"])
    assert z.shape == (2, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    text = encode_prompts(sd, b["prompt"], "cpu")
    assert text.shape == (2, sd.tokenizer.model_max_length, 32)
    assert a.rlf(z_ref, z_lq).shape == z.shape
    assert a.id_tokens(b["id_embedding"]).shape == (2, 2, 32)
    t = torch.tensor([10, 900])
    down, mid = a(z, t, text, z_lq, z_ref, b["id_embedding"])
    # One residual per UNet skip feature, shaped like the UNet's own skip features.
    skips = []
    h = sd.unet.conv_in(z)
    skips.append(h)
    temb = sd.unet.time_embedding(sd.unet.time_proj(t))
    for blk in sd.unet.down_blocks:
        kw = {"encoder_hidden_states": text} if getattr(blk, "has_cross_attention", False) else {}
        h, res = blk(hidden_states=h, temb=temb, **kw)
        skips += list(res)
    assert [d.shape for d in down] == [s.shape for s in skips]
    assert mid.shape == h.shape
    # Zero-initialised outputs: the adapters start as a no-op on the UNet.
    assert all(float(d.detach().abs().max()) == 0.0 for d in down) and float(mid.detach().abs().max()) == 0.0
    out = predict(sd, a, z, t, text, z_lq, z_ref, b["id_embedding"])
    assert out.shape == z.shape
    plain = sd.unet(z, t, encoder_hidden_states=text).sample
    assert torch.equal(out, plain)
    # Every branch is live once its zero convs move: LCA, RCA, and each link direction.
    with torch.no_grad():
        a.lca.mid_zero_conv.weight.fill_(0.01)
    out_lca = predict(sd, a, z, t, text, z_lq, z_ref, b["id_embedding"])
    assert not torch.equal(out_lca, plain)
    with torch.no_grad():
        a.rca.mid_zero_conv.weight.fill_(0.01)
    out_rca = predict(sd, a, z, t, text, z_lq, z_ref, b["id_embedding"])
    assert not torch.equal(out_rca, out_lca)
    with torch.no_grad():
        a.r2l[0].weight.fill_(0.01)
    assert not torch.equal(predict(sd, a, z, t, text, z_lq, z_ref, b["id_embedding"]), out_rca)
    # Identity changes RCA's output, hence the prediction.
    other = predict(sd, a, z, t, text, z_lq, z_ref, b["id_embedding"].flip(0))
    assert not torch.equal(other, predict(sd, a, z, t, text, z_lq, z_ref, b["id_embedding"]))


def test_frozen_unchanged_and_only_adapters_get_gradients(sd_dir, tmp_path):
    from refface.train.loop import train
    from refface.train.mgfr.task import MGFRTask, build_adapters

    sd = fresh_sd(sd_dir)
    cfg = mgfr_cfg(2)
    task = MGFRTask(sd, build_adapters(sd, cfg), cfg)
    frozen_before = {
        name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in task.frozen_modules().items()
    }
    adapters_before = {k: v.clone() for k, v in task.adapters.state_dict().items()}

    # One manual backward: gradients reach the adapters only.
    task.bind({"adapters": task.adapters}, torch.float32, torch.device("cpu"))
    for m in task.frozen_modules().values():
        m.requires_grad_(False)
    loss, _ = task.compute_loss(make_batch(2), torch.Generator().manual_seed(0))
    loss.backward()
    for m in task.frozen_modules().values():
        assert all(p.grad is None for p in m.parameters())
    grads = {n: p.grad for n, p in task.adapters.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert float(grads["lca.mid_zero_conv.weight"].abs().sum()) > 0
    assert float(grads["rca.mid_zero_conv.weight"].abs().sum()) > 0
    task.adapters.zero_grad(set_to_none=True)

    logs = train(task, make_loader(), loop_cfg(tmp_path, max_steps=3, checkpoint_every=3))
    assert len(logs) == 3 and all(np.isfinite(r["loss"]) for r in logs)
    for name, m in task.frozen_modules().items():
        for k, v in m.state_dict().items():
            assert torch.equal(v, frozen_before[name][k]), f"{name}.{k} changed"
    changed = [k for k, v in task.adapters.state_dict().items() if not torch.equal(v, adapters_before[k])]
    assert any(k.startswith("lca.") for k in changed) and any(k.startswith("rca.") for k in changed)


# Tens of optimizer steps of the tiny SD-1.5-shaped model (~8 s on 2 shared cores).
@pytest.mark.slow
def test_overfitting_one_batch_lowers_the_loss(sd_dir, tmp_path):
    from refface.train.loop import train
    from refface.train.mgfr.task import MGFRTask, build_adapters

    sd = fresh_sd(sd_dir)
    cfg = mgfr_cfg(1)
    task = MGFRTask(sd, build_adapters(sd, cfg), cfg)
    logs = train(
        task,
        make_loader(n=2, batch_size=2),
        loop_cfg(tmp_path, max_steps=60, learning_rate=2e-3, checkpoint_every=60, ema_decay=None),
    )
    losses = np.array([r["loss"] for r in logs])
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.6 * first, (first, last)


# Two training runs of the tiny SD-1.5-shaped model (~5 s).
@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(sd_dir, tmp_path):
    from refface.train.loop import train
    from refface.train.mgfr.task import MGFRTask, build_adapters

    def run(out, max_steps):
        sd = fresh_sd(sd_dir)
        cfg = mgfr_cfg(2)
        task = MGFRTask(sd, build_adapters(sd, cfg), cfg)
        return train(task, make_loader(n=6), loop_cfg(out, max_steps=max_steps, checkpoint_every=2))

    full = run(tmp_path / "full", 5)
    first = run(tmp_path / "split", 2)
    second = run(tmp_path / "split", 5)
    assert [r["step"] for r in second] == [3, 4, 5]
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]


@pytest.fixture(scope="module")
def trained_run(sd_dir, tmp_path_factory):
    """Stage 1 (3 steps) then stage 2 (2 steps) through the real entry point on the tiny config."""
    from accelerate.state import AcceleratorState, GradientState

    from refface.train.mgfr.train import main, parse_args

    out = tmp_path_factory.mktemp("mgfr_run")
    argv = ["--config", str(TINY_CONFIG), "--sd", str(sd_dir), "--output", str(out)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        logs1 = main(parse_args([*argv, "--stage", "1", "--max-steps", "3"]), dataloader=make_loader())
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        logs2 = main(parse_args([*argv, "--stage", "2", "--max-steps", "2"]), dataloader=make_loader())
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "argv": argv, "logs1": logs1, "logs2": logs2}


def test_entry_point_writes_checkpoints_logs_and_grids(trained_run):
    from refface.train.mgfr.train import main, parse_args

    out = trained_run["out"]
    assert [r["step"] for r in trained_run["logs1"]] == [1, 2, 3]
    assert [r["step"] for r in trained_run["logs2"]] == [1, 2]
    s1 = out / "stage1"
    assert (s1 / "config.json").is_file()
    ckpts = sorted(p.name for p in (s1 / "checkpoints").iterdir())
    assert ckpts == ["step_000002", "step_000003"]
    for c in ckpts:
        assert (s1 / "checkpoints" / c / "trainable" / "adapters.safetensors").is_file()
        assert (s1 / "checkpoints" / c / "ema" / "adapters.safetensors").is_file()
    assert list((s1 / "validation").glob("step_000003.png"))  # validate_every 4, and always at the end
    assert list((s1 / "logs").rglob("events.out.tfevents.*"))
    assert json.loads((s1 / "config.json").read_text())["task"]["mgfr"]["stage"] == 1
    s2 = out / "stage2"
    assert (s2 / "checkpoints" / "step_000002" / "state.json").is_file()
    state = json.loads((s2 / "checkpoints" / "step_000002" / "state.json").read_text())
    assert state["task"]["adapters"]["use_rca"] is True
    # A rerun of a finished stage does no work.
    argv = [*trained_run["argv"], "--stage", "2", "--max-steps", "2"]
    assert main(parse_args(argv), dataloader=make_loader()) == []


def test_stage2_first_output_equals_stage1(sd_dir, trained_run):
    from refface.train.checkpoints import load_trainable_weights
    from refface.train.mgfr.model import MGFRAdapters, encode_images, encode_prompts, predict
    from refface.train.mgfr.task import build_adapters

    s1 = trained_run["out"] / "stage1"
    sd = fresh_sd(sd_dir)
    stage1 = MGFRAdapters.from_unet(sd.unet, use_rca=False, id_dim=ID_DIM, num_id_tokens=2, rlf_channels=32)
    # Stage 2 starts from stage 1's EMA weights (init_use_ema).
    load_trainable_weights(s1 / "checkpoints" / "step_000003", {"adapters": stage1}, use_ema=True)
    stage2 = build_adapters(sd, mgfr_cfg(2), init_from=s1)
    b = make_batch(2, seed=3)
    z = encode_images(sd, b["gt"])
    z_lq, z_ref = encode_images(sd, b["lq"]), encode_images(sd, b["ref"])
    text = encode_prompts(sd, b["prompt"], "cpu")
    t = torch.tensor([3, 700])
    with torch.no_grad():
        o1 = predict(sd, stage1, z, t, text, z_lq)
        o2 = predict(sd, stage2, z, t, text, z_lq, z_ref, b["id_embedding"])
        plain = sd.unet(z, t, encoder_hidden_states=text).sample
    assert not torch.equal(o1, plain)  # stage 1 did learn something
    assert torch.equal(o1, o2)


def _write_faces(folder: Path, n: int, seed: int) -> None:
    from refface.manifests.io import write_png

    b = make_batch(n, seed)
    for i in range(n):
        arr = ((b["gt"][i] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        write_png(folder / f"face_{i}.png", np.ascontiguousarray(np.repeat(np.repeat(arr, 2, 0), 2, 1)))


def test_restore_command_stage1_and_rerun_skips(sd_dir, trained_run, tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    _write_faces(tmp_path / "lq", 2, seed=4)
    (tmp_path / "lq" / "broken.png").write_bytes(b"not an image")
    args = ["restore", "--model", "mgfr", "--input", str(tmp_path / "lq"), "--output", str(tmp_path / "out")]
    args += ["--checkpoint", str(trained_run["out"] / "stage1"), "--sd", str(sd_dir), "--steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    outs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert outs == ["face_0.png", "face_1.png"]
    from refface.manifests.io import read_image

    assert read_image(tmp_path / "out" / "face_0.png").shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert "broken.png" in (tmp_path / "out" / "errors.csv").read_text()
    first = (tmp_path / "out" / "face_0.png").read_bytes()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "skipped" in again.output
    assert (tmp_path / "out" / "face_0.png").read_bytes() == first
    # Options of other models are refused, required ones are named.
    bad = CliRunner().invoke(app, [*args[:-4], "--checkpoint", str(trained_run["out"] / "stage1")])
    assert bad.exit_code != 0 and "--sd" in bad.output


def test_restore_stage2_embeds_references_deterministically(sd_dir, trained_run, tmp_path, monkeypatch):
    from refface.train.mgfr.restore import restore_folder

    _write_faces(tmp_path / "lq", 2, seed=5)
    _write_faces(tmp_path / "refs", 1, seed=6)  # face_1 has no reference -> errors table
    kw = dict(checkpoint=trained_run["out"] / "stage2", sd=sd_dir, steps=2, embedder="dlib", device="cpu")
    counts = restore_folder(tmp_path / "lq", tmp_path / "a", references=tmp_path / "refs", **kw)
    assert counts == {"restored": 1, "skipped": 0, "errors": 1}
    restore_folder(tmp_path / "lq", tmp_path / "b", references=tmp_path / "refs", **kw)
    assert (tmp_path / "a" / "face_0.png").read_bytes() == (tmp_path / "b" / "face_0.png").read_bytes()
    with pytest.raises(ValueError, match="references"):
        restore_folder(tmp_path / "lq", tmp_path / "c", **kw)
    # The reference is embedded as the training set was mined (flip by default, or plain chips).
    import refface.train.mgfr.restore as restore_module

    made = []
    real = restore_module.make_embedder
    monkeypatch.setattr(
        restore_module, "make_embedder", lambda *a, **k: made.append(k["tta"]) or real(*a, **k)
    )
    restore_folder(tmp_path / "lq", tmp_path / "plain", references=tmp_path / "refs", tta="none", **kw)
    restore_folder(tmp_path / "lq", tmp_path / "flip", references=tmp_path / "refs", **kw)
    assert made == ["none", "flip"]
    assert (tmp_path / "flip" / "face_0.png").read_bytes() == (tmp_path / "a" / "face_0.png").read_bytes()
    with pytest.raises(ValueError, match="test-time augmentation"):
        restore_folder(tmp_path / "lq", tmp_path / "d", references=tmp_path / "refs", tta="mirror", **kw)


def test_missing_sd_folder_and_subfolder_are_named(tmp_path, sd_dir):
    from refface.train.mgfr.model import check_sd_folder

    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_sd_folder(tmp_path / "nowhere")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="vae/"):
        check_sd_folder(tmp_path / "partial")
    assert check_sd_folder(sd_dir) == sd_dir


def test_stage2_without_stage1_checkpoint_says_so(sd_dir, tmp_path):
    from refface.train.mgfr.train import main, parse_args

    argv = ["--config", str(TINY_CONFIG), "--sd", str(sd_dir), "--output", str(tmp_path), "--stage", "2"]
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        main(parse_args(argv), dataloader=make_loader())


def test_config_errors_are_actionable(tmp_path):
    from refface.train.mgfr.config import MGFRConfig, load_yaml_config

    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        MGFRConfig(stage=3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("loop: {max_steps: 1}\nmodel: {}\n")
    with pytest.raises(ValueError, match="unknown top-level keys"):
        load_yaml_config(bad, 1)
    loop, mgfr = load_yaml_config(TINY_CONFIG, 2)
    assert mgfr["stage"] == 2 and loop["max_steps"] == 4


# Backward passes with and without checkpointing plus a bf16 run (~19 s).
@pytest.mark.slow
def test_gradient_checkpointing_same_gradients_and_bf16_accumulation_runs(sd_dir, tmp_path):
    from refface.train.loop import train
    from refface.train.mgfr.task import MGFRTask, build_adapters

    def grads(checkpointing: bool):
        sd = fresh_sd(sd_dir)
        cfg = mgfr_cfg(2)
        task = MGFRTask(sd, build_adapters(sd, cfg), cfg)
        # Move the zero convs so gradients flow through both branches and the links.
        with torch.no_grad():
            for name, p in task.adapters.named_parameters():
                if "zero_conv" in name or name.startswith(("r2l", "l2r")):
                    p.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(name)))
        if checkpointing:
            task.adapters.enable_gradient_checkpointing()
            sd.unet.enable_gradient_checkpointing()
        task.adapters.train()
        task.bind({"adapters": task.adapters}, torch.float32, torch.device("cpu"))
        loss, _ = task.compute_loss(make_batch(2), torch.Generator().manual_seed(0))
        loss.backward()
        return {n: p.grad.clone() for n, p in task.adapters.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6)

    sd = fresh_sd(sd_dir)
    cfg = mgfr_cfg(2)
    task = MGFRTask(sd, build_adapters(sd, cfg), cfg)
    logs = train(
        task,
        make_loader(),
        loop_cfg(
            tmp_path,
            max_steps=2,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            gradient_accumulation_steps=2,
        ),
    )
    assert [r["step"] for r in logs] == [1, 2] and all(np.isfinite(r["loss"]) for r in logs)
    assert sd.unet.dtype == torch.bfloat16 and task.adapters.dtype == torch.float32
    assert task.adapters.lca.down_blocks[0].gradient_checkpointing


# Shards written, then both training stages through the entry point (~6 s).
@pytest.mark.slow
def test_entry_point_on_real_shards_both_stages(sd_dir, tmp_path):
    # The whole path with the shared input pipeline: dataset root -> WebDataset shards -> both stages.
    from accelerate.state import AcceleratorState, GradientState

    from refface.train.mgfr.train import main, parse_args

    root = make_tiny_root(tmp_path / "root")
    write_shards(root, tmp_path / "shards", ShardsConfig(split="train"))
    # The tiny root's embeddings are 8-d: the config leaves id_dim to the data.
    argv = ["--config", str(TINY_CONFIG), "--dataset", str(tmp_path / "shards"), "--sd", str(sd_dir)]
    argv += ["--output", str(tmp_path / "out"), "--max-steps", "2"]
    for stage in (1, 2):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        logs = main(parse_args([*argv, "--stage", str(stage)]))
        assert [r["step"] for r in logs] == [1, 2] and all(np.isfinite(r["loss"]) for r in logs)
        assert (tmp_path / "out" / f"stage{stage}" / "checkpoints" / "step_000002" / "state.json").is_file()


def test_train_command_names_a_missing_sd_folder(tmp_path):
    from typer.testing import CliRunner

    from refface.cli import app

    args = [
        "train",
        "mgfr",
        "--config",
        str(TINY_CONFIG),
        "--dataset",
        str(tmp_path),
        "--sd",
        str(tmp_path / "sd"),
    ]
    result = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "out")])
    assert result.exit_code != 0
    text = " ".join(result.output.replace("│", " ").split())  # the error panel wraps lines
    assert "does not exist" in text and "diffusers folder" in text


def test_stage2_with_frozen_lca_trains_rca_only_and_ema_loads_strictly(sd_dir, tmp_path):
    from refface.train.checkpoints import load_trainable_weights
    from refface.train.loop import train
    from refface.train.mgfr.model import MGFRAdapters
    from refface.train.mgfr.task import MGFRTask, build_adapters

    sd = fresh_sd(sd_dir)
    cfg = mgfr_cfg(2, train_lca_in_stage2=False)
    task = MGFRTask(sd, build_adapters(sd, cfg), cfg)
    lca_before = {k: v.clone() for k, v in task.adapters.lca.state_dict().items()}
    train(task, make_loader(), loop_cfg(tmp_path, max_steps=2, checkpoint_every=2))
    assert all(torch.equal(v, lca_before[k]) for k, v in task.adapters.lca.state_dict().items())
    fresh = MGFRAdapters.from_unet(sd.unet, use_rca=True, id_dim=ID_DIM, num_id_tokens=2, rlf_channels=32)
    assert load_trainable_weights(tmp_path / "checkpoints" / "step_000002", {"adapters": fresh}) == "ema"


def test_id_dim_comes_from_the_dataset_and_a_mismatch_names_both_sides(tmp_path):
    from common.tiny_root import EMB_DIM

    from refface.train.mgfr.config import MGFRConfig
    from refface.train.mgfr.train import check_resume_id_dim, resolve_id_dim

    root = make_tiny_root(tmp_path / "root")
    assert resolve_id_dim(mgfr_cfg(2, id_dim=None), str(root)).id_dim == EMB_DIM
    assert resolve_id_dim(mgfr_cfg(2, id_dim=EMB_DIM), str(root)).id_dim == EMB_DIM
    with pytest.raises(ValueError) as err:
        resolve_id_dim(mgfr_cfg(2, id_dim=512), str(root), config_path="configs/x.yaml")
    text = str(err.value)
    assert f"dataset {root} (test, embeddings.json) gives {EMB_DIM}-d" in text
    assert "mgfr.id_dim in configs/x.yaml expects 512-d" in text
    # Without a dataset, stage 2 reads the size from the batches it is given.
    assert resolve_id_dim(mgfr_cfg(2, id_dim=None), None, make_loader()).id_dim == ID_DIM
    # Stage 2 without any embeddings says what to do.
    (root / "embeddings.json").unlink()
    (root / "embeddings.npy").unlink()
    with pytest.raises(ValueError, match="needs identity embeddings"):
        resolve_id_dim(mgfr_cfg(2, id_dim=None), str(root))
    assert resolve_id_dim(mgfr_cfg(1, id_dim=None), str(root)).id_dim is None
    # Resuming a stage-2 run built for another size.
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"task": {"mgfr": {"id_dim": 512}}}))
    with pytest.raises(ValueError, match=r"this run's data gives 128-d .* checkpoint it resumes"):
        check_resume_id_dim(MGFRConfig(stage=2, id_dim=128), tmp_path / "run", "latest")
    check_resume_id_dim(MGFRConfig(stage=2, id_dim=512), tmp_path / "run", "latest")


def test_negative_attribute_samples_appear_at_the_configured_share():
    from refface.train.samplers import MGFRSampler, SamplingConfig

    nq, na, n = 0.2, 0.3, 400
    sampler = MGFRSampler(
        SamplingConfig(resolution=32, seed=3), negative_quality_fraction=nq, negative_attribute_fraction=na
    )
    # The degradation itself is tested with the degradations; here a cheap stand-in keeps 400 samples quick.
    sampler.degrade = lambda img, key: np.ascontiguousarray(img // 2)
    rng = np.random.default_rng(0)
    hq = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    counts = {"quality": 0, "attribute": 0, "positive": 0}
    for i in range(n):
        attrs = {"prompt": f"a photo of person {i}", "negative_attribute_prompt": f"not person {i}"}
        raw = {"key": f"k{i}", "hq": hq, "refs": [hq], "id_embedding": np.ones(4, np.float32), "attrs": attrs}
        out = sampler(raw)
        if bool(out["negative_attribute"]):
            counts["attribute"] += 1
            assert out["prompt"] == f"not person {i}"
            assert not bool(out["negative_quality"])
        elif bool(out["negative_quality"]):
            counts["quality"] += 1
            assert "low-quality" in out["prompt"]
        else:
            counts["positive"] += 1
            assert out["prompt"] == f"a photo of person {i}"
        # Negative samples have a degraded target; positive ones the clean (possibly flipped) one.
        clean = torch.from_numpy(hq).permute(2, 0, 1).float() / 127.5 - 1
        is_clean = any(torch.allclose(out["gt"], c, atol=1e-5) for c in (clean, clean.flip(-1)))
        positive = not bool(out["negative_attribute"]) and not bool(out["negative_quality"])
        assert is_clean == positive
    # Binomial spread at n=400 is about 8-9 samples; 4 standard deviations of slack.
    for kind, share in (("quality", nq), ("attribute", na), ("positive", 1 - nq - na)):
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(counts[kind] - n * share) < 4 * sd, (kind, counts)
    # A sample without a negative-attribute prompt stays positive and is counted as missing.
    drawn = next(f"k{i}" for i in range(n) if sampler.negative_kind(f"k{i}") == "attribute")
    raw = {"key": drawn, "hq": hq, "refs": [], "id_embedding": None, "attrs": {"prompt": "p"}}
    out = sampler(raw)
    assert out["prompt"] == "p" and not bool(out["negative_attribute"]) and bool(out["attrs_missing"])
    # Evaluation samplers make no negatives.
    evaluation = MGFRSampler(SamplingConfig(resolution=16, train=False), 0.5, None, 0.5)
    assert all(evaluation.negative_kind(f"k{i}") is None for i in range(50))
    with pytest.raises(ValueError, match="sum to at most 1"):
        MGFRSampler(SamplingConfig(resolution=16), 0.6, None, 0.5)


def test_negative_attribute_share_reaches_the_training_logs(sd_dir, tmp_path):
    from refface.train.loop import train
    from refface.train.mgfr.task import MGFRTask, build_adapters

    sd = fresh_sd(sd_dir)
    cfg = mgfr_cfg(1)
    task = MGFRTask(sd, build_adapters(sd, cfg), cfg)
    loader = make_loader()
    batch = next(iter(loader))
    assert "negative_attribute" not in batch  # the hand-made batches carry none: share 0
    logs = train(task, loader, loop_cfg(tmp_path, max_steps=1, checkpoint_every=1))
    assert logs[0]["negative_attribute_share"] == 0.0 and "negative_quality_share" in logs[0]


def _spy_sampler(monkeypatch):
    import refface.train.mgfr.restore as restore

    calls = []
    real = restore.sample

    def spy(*args, **kwargs):
        calls.append(
            {"prompts": list(args[3]), "negatives": list(kwargs.get("negative_attribute_prompts") or [])}
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(restore, "sample", spy)  # where restore_folder looks it up
    return calls


def test_per_image_prompts_reach_the_sampler(sd_dir, trained_run, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from refface.cli import app
    from refface.train.mgfr.restore import restore_folder

    calls = _spy_sampler(monkeypatch)
    _write_faces(tmp_path / "lq", 3, seed=7)
    table = pd.DataFrame(
        {
            "path": ["face_0.png", "face_1"],
            "prompt": ["a woman with red hair", ""],
            "negative_attribute_prompt": ["black hair", ""],
            "attributes": ["", "green eyes, beard"],
        }
    )
    table.to_csv(tmp_path / "attrs.csv", index=False)
    kw = dict(checkpoint=trained_run["out"] / "stage1", sd=sd_dir, steps=1, device="cpu", batch_size=3)
    counts = restore_folder(
        tmp_path / "lq", tmp_path / "out", attributes=tmp_path / "attrs.csv", prompt="plain", **kw
    )
    assert counts["restored"] == 3 and counts["without attributes"] == 1
    prompts = dict(zip(["face_0.png", "face_1.png", "face_2.png"], calls[0]["prompts"], strict=True))
    negatives = dict(zip(["face_0.png", "face_1.png", "face_2.png"], calls[0]["negatives"], strict=True))
    assert prompts["face_0.png"] == "a woman with red hair" and negatives["face_0.png"] == "black hair"
    assert prompts["face_1.png"] == "a high-quality photo of a person, green eyes, beard"
    assert "brown eyes" in negatives["face_1.png"] and "clean-shaven" in negatives["face_1.png"]
    assert prompts["face_2.png"] == "plain" and negatives["face_2.png"] == ""

    # One image, typed attributes, both guidance weights on the command line.
    calls.clear()
    args = ["restore", "--model", "mgfr", "--input", str(tmp_path / "lq" / "face_2.png")]
    args += ["--output", str(tmp_path / "one"), "--checkpoint", str(trained_run["out"] / "stage1")]
    args += ["--sd", str(sd_dir), "--steps", "1", "--attributes", "blue eyes, beard"]
    args += ["--w-quality", "0.5", "--w-attribute", "2.0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["face_2.png"]
    assert calls[0]["prompts"] == ["a high-quality photo of a person, blue eyes, beard"]
    assert calls[0]["negatives"][0].startswith("brown eyes, green eyes")


def test_sampler_negative_prompts_change_the_output(sd, tmp_path):
    from refface.train.mgfr.model import GuidanceConfig, MGFRAdapters, sample

    a = MGFRAdapters.from_unet(sd.unet, use_rca=False)
    lq = make_batch(2)["lq"]
    g = GuidanceConfig(steps=2, w_quality=0.0, w_attribute=3.0)

    def run(negatives):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return sample(sd, a, lq, ["a face", "a face"], g, gens, negative_attribute_prompts=negatives)

    base = run(["", ""])
    changed = run(["", "blue eyes"])
    assert torch.equal(base[0], changed[0]) and not torch.equal(base[1], changed[1])
    with pytest.raises(ValueError, match="1 negative-attribute prompts for 2 images"):
        run(["x"])
