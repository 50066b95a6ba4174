"""ReF-LDM trainer on the shared loop: overfitting, exact resume and the three-stage entry point."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from common.tiny_refldm import TINY, _fresh_accelerate_state, _one_thread  # noqa: F401  (autouse fixtures)

from refface.train.checkpoints import list_checkpoints
from refface.train.loop import train
from refface.train.loop_config import LoopConfig
from refface.train.refldm import train as refldm_train
from refface.train.refldm.config import load_config
from refface.train.refldm.identity import iresnet
from refface.train.refldm.model import RefLDMUNet
from refface.train.refldm.tasks import LDMTask
from refface.train.refldm.vqgan import build_vqgan


def tiny_items(n: int = 4, size: int = 32, k: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        gt = torch.rand(3, size, size, generator=g) * 2 - 1
        lq = (gt + 0.3 * torch.randn(3, size, size, generator=g)).clamp(-1, 1)
        refs = (gt.expand(k, 3, size, size) + 0.1 * torch.randn(k, 3, size, size, generator=g)).clamp(-1, 1)
        mask = torch.tensor([True] * (k - 1) + [i % 2 == 0])
        items.append({"gt": gt, "lq": lq, "refs": refs, "ref_mask": mask, "key": f"img{i:03d}"})
    return items


def tiny_loader(n: int = 4, batch_size: int = 2):
    return torch.utils.data.DataLoader(tiny_items(n), batch_size=batch_size, shuffle=True)


def tiny_task(stage: str = "refldm", identity: bool = True) -> LDMTask:
    cfg, _ = load_config(TINY)
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, stage=stage))
    torch.manual_seed(0)
    vq = build_vqgan(cfg.vqgan)
    unet = RefLDMUNet.from_unet_config(cfg.unet)
    arcface = iresnet("r18", widths=(4, 8, 8, 8)) if identity else None
    return LDMTask(cfg, unet, vq, arcface)


def loop_config(out: Path, steps: int, **kw) -> LoopConfig:
    _, loop_raw = load_config(TINY)
    return LoopConfig.from_dict({**loop_raw, "output_dir": str(out), "max_steps": steps, **kw})


def test_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet:\n  base_channel: 3\n")
    with pytest.raises(ValueError, match="base_channel"):
        load_config(bad)


def test_overfitting_one_batch_lowers_the_loss(tmp_path):
    task = tiny_task(identity=True)
    batch = torch.utils.data.default_collate(tiny_items(2))
    # The same batch every step, and no condition dropout, so only the noise draw varies.
    task.cfg = dataclasses.replace(
        task.cfg, task=dataclasses.replace(task.cfg.task, lq_dropout=0.0, ref_dropout=0.0)
    )
    loader = torch.utils.data.DataLoader([batch] * 30, batch_size=None)
    logs = train(
        task, loader, loop_config(tmp_path, 30, learning_rate=3e-3, ema_decay=None, checkpoint_every=1000)
    )
    first = sum(r["loss"] for r in logs[:5]) / 5
    last = sum(r["loss"] for r in logs[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert all("identity" in r and r["identity"] >= 0 for r in logs)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = train(tiny_task(), tiny_loader(), loop_config(tmp_path / "a", 4))
    part1 = train(tiny_task(), tiny_loader(), loop_config(tmp_path / "b", 2))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    part2 = train(tiny_task(), tiny_loader(), loop_config(tmp_path / "b", 4))
    assert [r["step"] for r in part1 + part2] == [1, 2, 3, 4]
    assert [r["loss"] for r in part1 + part2] == [r["loss"] for r in full]
    assert [r["identity"] for r in part1 + part2] == [r["identity"] for r in full]
    from safetensors.torch import load_file

    a = load_file(str(list_checkpoints(tmp_path / "a")[-1] / "trainable" / "unet.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "b")[-1] / "trainable" / "unet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_entry_point_runs_the_three_stages(tmp_path, monkeypatch):
    arcface_file = tmp_path / "arcface_tiny.pth"
    torch.manual_seed(0)
    torch.save(iresnet("r18", widths=(4, 8, 8, 8)).state_dict(), arcface_file)
    cfg_text = TINY.read_text().replace(
        "  arcface_arch: r18", f"  arcface: {arcface_file}\n  arcface_arch: r18"
    )
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(cfg_text.replace("validate_every: 0", "validate_every: 2"))
    seen = {}

    def fake_loader(dataset, cfg, seed):
        seen["dataset"] = dataset
        return tiny_loader()

    monkeypatch.setattr(refldm_train, "make_dataloader", fake_loader)
    out = tmp_path / "run"
    for stage in ("vqgan", "ldm", "refldm"):
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        args = refldm_train.parse_args(
            ["--config", str(cfg_file), "--dataset", "ROOT", "--stage", stage, "--output", str(out)]
        )
        logs = refldm_train.main(args)
        assert len(logs) == 4 and all(r["loss"] == r["loss"] for r in logs)
        assert (out / stage / "model" / "refldm.json").is_file()
        assert len(list_checkpoints(out / stage)) == 2
        assert (out / stage / "validation" / "step_000004.png").is_file()
    assert seen["dataset"] == "ROOT"
    assert (out / "refldm" / "model" / "unet" / "config.json").is_file()
    meta = json.loads((out / "refldm" / "model" / "refldm.json").read_text())
    assert meta["config"]["task"]["stage"] == "refldm"
    assert meta["config"]["vqgan"]["pretrained"].endswith("vqgan/model/vqgan")
    # Running stage C again does no work: the run is complete and resumes at its last step.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    again = refldm_train.main(
        refldm_train.parse_args(
            ["--config", str(cfg_file), "--dataset", "ROOT", "--stage", "refldm", "--output", str(out)]
        )
    )
    assert again == []


@pytest.mark.parametrize("frozen_fp32", [True, False])
def test_frozen_models_stay_fp32_under_bf16(tmp_path, frozen_fp32):
    task = tiny_task(identity=True)
    task.cfg = dataclasses.replace(task.cfg, task=dataclasses.replace(task.cfg.task, frozen_fp32=frozen_fp32))
    logs = train(
        task,
        tiny_loader(2),
        loop_config(tmp_path, 1, mixed_precision="bf16", ema_decay=None, checkpoint_every=1000),
    )
    want = torch.float32 if frozen_fp32 else torch.bfloat16
    assert next(task.vq.parameters()).dtype == want and next(task.arcface.parameters()).dtype == want
    assert torch.isfinite(torch.tensor(logs[0]["loss"]))


def test_joint_reference_encoding_in_training(tmp_path):
    task = tiny_task(identity=False)
    task.cfg = dataclasses.replace(task.cfg, task=dataclasses.replace(task.cfg.task, ref_encoding="joint"))
    task.bind({"unet": task.unet}, torch.float32, torch.device("cpu"))
    batch = torch.utils.data.default_collate(tiny_items(2))
    _, _, zref, mask = task._latents(batch)
    from refface.train.refldm.vqgan import encode_references

    with torch.no_grad():
        expected = encode_references(task.vq, batch["refs"], batch["ref_mask"], joint=True)
    assert torch.allclose(zref, expected) and mask is not None
    # the second sample's padding reference gets a zero latent
    assert float(zref[1, 1].abs().max()) == 0.0
