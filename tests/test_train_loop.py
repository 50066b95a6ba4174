"""Tests for the shared training loop with a toy task: exact resume, frozen parts, checkpoints, EMA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from common.tiny_refldm import _fresh_accelerate_state  # noqa: F401  (autouse fixture)

from refface.train.checkpoints import find_checkpoint, list_checkpoints, load_trainable_weights
from refface.train.loop import train
from refface.train.loop_config import LoopConfig, TrainTask


class ToyTask:
    """y = frozen(x) + trainable(x) + noise; noise comes only from the loop's generator."""

    def __init__(self, seed: int = 0) -> None:
        # The frozen part is always the same (it stands for pretrained weights); ``seed`` varies the head.
        self.frozen = torch.nn.Linear(4, 4)
        self.head = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 4))
        with torch.no_grad():
            for p in self.frozen.parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(123)) * 0.5)
            g = torch.Generator().manual_seed(seed)
            for p in self.head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.modules = None

    def trainable_modules(self):
        return {"head": self.head}

    def frozen_modules(self):
        return {"frozen": self.frozen}

    def bind(self, modules, weight_dtype, device):
        self.modules = modules
        self.dtype = weight_dtype

    def compute_loss(self, batch, generator):
        x = batch["x"]
        noise = torch.randn(x.shape, generator=generator, device=generator.device)
        pred = self.modules["head"](x + 0.1 * noise) + self.frozen(x.to(self.dtype)).float()
        loss = torch.nn.functional.mse_loss(pred, batch["y"])
        return loss, {"pred_abs": float(pred.detach().abs().mean())}

    def validation_grid(self, batch, generator):
        return np.full((8, 16, 3), 127, dtype=np.uint8)

    def config_dict(self):
        return {"name": "toy"}


def _loader(n: int = 12, batch_size: int = 2):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(n, 4, generator=g)
    ys = torch.randn(n, 4, generator=g)
    items = [{"x": xs[i], "y": ys[i]} for i in range(n)]
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=True)


def _cfg(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=10,
        learning_rate=1e-2,
        ema_decay=0.9,
        checkpoint_every=4,
        validate_every=5,
        log_every=1,
        report_to="none",
        gradient_accumulation_steps=1,
    )
    base.update(kw)
    return LoopConfig(**base)


def test_toy_task_satisfies_protocol():
    assert isinstance(ToyTask(), TrainTask)


def test_config_validation_messages(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        _cfg(tmp_path, mixed_precision="fp8")
    with pytest.raises(ValueError, match="unknown loop config keys"):
        LoopConfig.from_dict({"output_dir": "x", "max_steps": 1, "lr": 1})


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_reproduces_uninterrupted_losses(tmp_path, accum):
    # 12 items / batch 2 = 6 batches an epoch: 10 steps cross epoch boundaries, and with accumulation 2
    # the checkpoint at step 4 sits mid-epoch.
    full = train(ToyTask(), _loader(), _cfg(tmp_path / "full", gradient_accumulation_steps=accum))
    assert [r["step"] for r in full] == list(range(1, 11))

    first = train(
        ToyTask(), _loader(), _cfg(tmp_path / "split", max_steps=4, gradient_accumulation_steps=accum)
    )
    # A different initialisation proves the weights come from the checkpoint, not the constructor.
    second = train(ToyTask(seed=5), _loader(), _cfg(tmp_path / "split", gradient_accumulation_steps=accum))
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert [r["step"] for r in second] == list(range(5, 11))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]

    a = load_file_dict(tmp_path / "full" / "checkpoints" / "step_000010" / "ema" / "head.safetensors")
    b = load_file_dict(tmp_path / "split" / "checkpoints" / "step_000010" / "ema" / "head.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k])


def load_file_dict(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_outputs_frozen_weights_and_checkpoint_layout(tmp_path):
    task = ToyTask()
    frozen_before = {k: v.clone() for k, v in task.frozen.state_dict().items()}
    head_before = {k: v.clone() for k, v in task.head.state_dict().items()}
    logs = train(task, _loader(), _cfg(tmp_path, checkpoints_total_limit=2))

    for k, v in task.frozen.state_dict().items():
        assert torch.equal(v, frozen_before[k])
    assert not any(p.requires_grad for p in task.frozen.parameters())
    assert any(not torch.equal(v, head_before[k]) for k, v in task.head.state_dict().items())
    assert all(np.isfinite(r["loss"]) and "grad_norm" in r and "pred_abs" in r for r in logs)

    ckpts = list_checkpoints(tmp_path)
    # Written at 4, 8, 10; the limit keeps the newest two.
    assert [c.name for c in ckpts] == ["step_000008", "step_000010"]
    last = find_checkpoint(tmp_path, "latest")
    assert last == ckpts[-1]
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 10 and state["loop"]["max_steps"] == 10 and state["task"] == {"name": "toy"}
    assert (last / "trainable" / "head.safetensors").is_file()
    assert (last / "ema" / "ema.json").is_file()
    assert sorted(p.name for p in (tmp_path / "validation").glob("*.png")) == [
        "step_000005.png",
        "step_000010.png",
    ]
    assert json.loads((tmp_path / "config.json").read_text())["loop"]["learning_rate"] == 1e-2

    # The live trainable weights in the checkpoint are the module's final weights; EMA differs from them.
    fresh = ToyTask(seed=9)
    assert load_trainable_weights(last, {"head": fresh.head}, use_ema=False) == "trainable"
    for k, v in fresh.head.state_dict().items():
        assert torch.equal(v, task.head.state_dict()[k])
    assert load_trainable_weights(last, {"head": fresh.head}, use_ema=True) == "ema"
    assert any(not torch.equal(v, task.head.state_dict()[k]) for k, v in fresh.head.state_dict().items())


def test_finished_run_resumes_to_nothing(tmp_path):
    train(ToyTask(), _loader(), _cfg(tmp_path, max_steps=3))
    assert train(ToyTask(), _loader(), _cfg(tmp_path, max_steps=3)) == []


def test_loss_decreases_and_resume_none_restarts(tmp_path):
    logs = train(ToyTask(), _loader(), _cfg(tmp_path, max_steps=40, learning_rate=3e-2, checkpoint_every=40))
    first = np.mean([r["loss"] for r in logs[:5]])
    last = np.mean([r["loss"] for r in logs[-5:]])
    assert last < 0.7 * first
    again = train(ToyTask(), _loader(), _cfg(tmp_path, max_steps=2, resume=None))
    assert [r["step"] for r in again] == [1, 2]


def test_tensorboard_logs_and_bf16_frozen_cast(tmp_path):
    task = ToyTask()
    logs = train(
        task, _loader(), _cfg(tmp_path, max_steps=3, report_to="tensorboard", mixed_precision="bf16")
    )
    assert len(logs) == 3 and all(np.isfinite(r["loss"]) for r in logs)
    assert task.frozen.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in task.head.parameters())
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


DDP_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from test_train_loop import ToyTask, _loader, _cfg
from refface.train.loop import train
from accelerate import PartialState
logs = train(ToyTask(), _loader(), _cfg(sys.argv[1], max_steps=int(sys.argv[2]), checkpoint_every=2))
state = PartialState()
if state.is_main_process:
    json.dump({{"world": state.num_processes, "losses": [r["loss"] for r in logs]}}, open(sys.argv[3], "w"))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_resume_is_exact(tmp_path):
    # Two CPU processes under torchrun (gloo): sharded data, every rank's RNG saved, exact resume.
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_toy.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))

    def run(out, steps):
        res = tmp_path / f"{out}_{steps}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(_free_port())]
        args = [*cmd, str(script), str(tmp_path / out), str(steps), str(res)]
        proc = subprocess.run(args, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return json.loads(res.read_text())

    full = run("full", 6)
    assert full["world"] == 2
    first, second = run("split", 2), run("split", 6)
    assert first["losses"] + second["losses"] == full["losses"]
    assert (
        tmp_path / "split" / "checkpoints" / "step_000006" / "accelerate" / "random_states_1.pkl"
    ).is_file()


def test_empty_dataloader_is_an_error(tmp_path):
    empty = torch.utils.data.DataLoader([], batch_size=2)
    with pytest.raises(ValueError, match="no batch"):
        train(ToyTask(), empty, _cfg(tmp_path))


class _Stream(torch.utils.data.IterableDataset):
    """A streaming dataset whose order depends on the epoch the loop sets."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(100 + self.epoch)
        for _ in range(5):
            yield {"x": torch.randn(4, generator=g), "y": torch.randn(4, generator=g)}


def test_streaming_dataset_resume_is_exact(tmp_path):
    def loader():
        return torch.utils.data.DataLoader(_Stream(), batch_size=2)  # 3 batches an epoch (last has 1)

    full = train(ToyTask(), loader(), _cfg(tmp_path / "full", max_steps=7))
    first = train(ToyTask(), loader(), _cfg(tmp_path / "split", max_steps=4))
    second = train(ToyTask(seed=3), loader(), _cfg(tmp_path / "split", max_steps=7))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_000004" / "state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)
