"""A small, deterministic Lightning fit of the digits MLP with the dpkfac strategy, for checkpoint tests.

Run as a subprocess (Lightning's launcher re-runs this command line for the other ranks):

    python tests/scripts/fit_digits.py --devices 2 --epochs 3 --ckpt-dir D [--resume D/epoch=0.ckpt]
        [--out result.pt] [--kill-rank 1 --kill-at-step 12] [--precision bf16-mixed] [--accumulate 2]
        [--clip 1e-3 --momentum 0 --lr 1] [--manual] [--num-nodes 2]
        [--hidden 256 --batch-size 8 --gather-rows 0] [--max-factor-dim 24]

Rank 0 writes ``--out``: final parameters, per-step training losses, every rank's K-FAC factors as they
were right after the checkpoint was restored (before any training step), the factor dtype, the number of
K-FAC steps and the largest parameter update of a step.
"""

from __future__ import annotations

import argparse
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_dpkfac
from lightning_dpkfac.data import DigitsDataModule
from lightning_dpkfac.models import ClassifierModule, mlp


class ManualClassifier(ClassifierModule):
    """The same classifier trained with manual optimization: ``opt.step()`` on the LightningOptimizer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        opt.step()
        return loss


class Recorder(pl.Callback):
    """Keeps per-step losses and update sizes, the factors at fit start, and kills a rank on request."""

    def __init__(self, kill_rank: int | None, kill_at_step: int | None) -> None:
        self.losses: dict[int, float] = {}
        self.factors_at_start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kill_rank, self.kill_at_step = kill_rank, kill_at_step
        self.max_update_norm = 0.0
        self.row_layers: list[str] = []
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pre = trainer.strategy.preconditioner
        for layer in pre.layers:
            factors = pre.factors(layer.name)
            if factors is not None:
                self.factors_at_start[layer.name] = (factors[0].clone(), factors[1].clone())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pre = trainer.strategy.preconditioner
        self.row_layers = [pre.layers[i].name for i in pre.row_layers]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        update = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(pl_module.parameters(), self._before)])
        self.max_update_norm = max(self.max_update_norm, float(update.norm()))
        if trainer.global_rank == self.kill_rank and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ckpt-dir", type=Path, required=True)
    p.add_argument("--resume", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--manual", action="store_true")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gather-rows", type=int, default=1)
    p.add_argument("--max-factor-dim", type=int, default=None)
    args = p.parse_args()

    pl.seed_everything(0, workers=True)
    recorder = Recorder(args.kill_rank, args.kill_at_step)
    strategy = lightning_dpkfac.DPKFACStrategy(
        damping=1e-2, inv_update_steps=7, gather_rows=bool(args.gather_rows), max_factor_dim=args.max_factor_dim,
        timeout=timedelta(seconds=args.timeout_s),
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy,
        max_epochs=args.epochs, precision=args.precision, accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        callbacks=[recorder, ModelCheckpoint(dirpath=args.ckpt_dir, save_top_k=-1, every_n_epochs=1)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, deterministic=True,
    )
    module_class = ManualClassifier if args.manual else ClassifierModule
    module = module_class(mlp(hidden=(args.hidden,)), lr=args.lr, momentum=args.momentum)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=args.batch_size, flatten=True), ckpt_path=args.resume)

    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, recorder.factors_at_start)
    if trainer.is_global_zero and args.out is not None:
        torch.save(
            {
                "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
                "losses": recorder.losses,
                "factors_at_start": gathered,
                "owners": {l.name: o for l, o in zip(strategy.preconditioner.layers, strategy.preconditioner.owners)},
                "steps": trainer.global_step,
                "kfac_steps": strategy.preconditioner.steps,
                "factor_dtype": str(next(iter(strategy.preconditioner._states.values())).A.dtype),
                "max_update_norm": recorder.max_update_norm,
                "row_layers": recorder.row_layers,
            },
            args.out,
        )


if __name__ == "__main__":
    main()
    lightning_dpkfac.exit_process(0)
