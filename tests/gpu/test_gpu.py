"""CUDA checks, skipped where no GPU is present (CI has none). Run them on a GPU machine with
``python -m pytest tests/gpu``; 2-GPU NCCL cases need at least two devices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT, launch_env
from lightning_dpkfac import KFACPreconditioner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _train(device: str, overlap: bool | str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).double().to(device)
    pre = KFACPreconditioner(model, kl_clip=1e-3, lr=0.1, factor_update_steps=1, inv_update_steps=2,
                             overlap_decompositions=overlap)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        model.zero_grad()
        x = torch.randn(8, 2, 6, 6, generator=g, dtype=torch.float64).to(device)
        y = torch.randint(0, 5, (8,), generator=g).to(device)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        assert all(t.device.type == torch.device(device).type for t in pre.factors("0"))
    return [p.grad.cpu() for p in model.parameters()]


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_on_cuda_matches_cpu(overlap: bool) -> None:
    """Overlapped (the CUDA default, "auto": a side stream) or not, CUDA computes what the CPU does."""
    for cpu, cuda in zip(_train("cpu", overlap), _train("cuda", "auto" if overlap else False)):
        torch.testing.assert_close(cuda, cpu, rtol=1e-8, atol=1e-10)


def test_overlapped_decompositions_run_on_a_side_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_dpkfac.core import preconditioner as engine_module

    streams: list[torch.cuda.Stream] = []
    decompose = engine_module.decompose_with_retries

    def recording(*args: object) -> object:
        streams.append(torch.cuda.current_stream())
        return decompose(*args)

    monkeypatch.setattr(engine_module, "decompose_with_retries", recording)
    _train("cuda", "auto")
    main = torch.cuda.current_stream()
    assert streams[0] == main, "step 0 decomposes on the main stream, at once"
    assert len(streams) > 2 and all(s != main for s in streams[2:]), "later steps on the side stream"


def test_fp16_autocast_with_grad_scaler_keeps_float32_factors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).cuda()
    pre = KFACPreconditioner(model, kl_clip=None)
    scaler = torch.amp.GradScaler("cuda")
    pre.set_loss_scale(scaler.get_scale)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(torch.randn(64, 16, device="cuda")), torch.randint(0, 4, (64,), device="cuda"))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        pre.step()
        scaler.step(opt)
        scaler.update()
    A, G = pre.factors("2")
    assert A.dtype == G.dtype == torch.float32 and torch.isfinite(G).all()


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_lightning_gpu_run(tmp_path: Path, precision: str) -> None:
    devices = min(torch.cuda.device_count(), 2)
    code = (
        "import lightning.pytorch as pl, lightning_dpkfac\n"
        "from lightning_dpkfac.tools.data import DigitsDataModule\n"
        "from lightning_dpkfac.tools.models import ClassifierModule, cnn\n"
        f"t = pl.Trainer(accelerator='gpu', devices={devices}, strategy='dpkfac', precision='{precision}',"
        " max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)\n"
        "m = ClassifierModule(cnn())\n"
        "t.fit(m, datamodule=DigitsDataModule())\n"
        "assert t.strategy.preconditioner.steps == t.global_step > 0\n"
        "lightning_dpkfac.exit_process(0)\n"
    )
    script = tmp_path / "gpu_fit.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=launch_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
