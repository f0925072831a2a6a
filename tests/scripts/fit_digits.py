"""A small, deterministic Lightning fit of the digits MLP with the dpkfac strategy, for the Lightning tests.

Run as a subprocess (Lightning's launcher re-runs this command line for the other ranks):

    python tests/scripts/fit_digits.py --devices 2 --epochs 3 --ckpt-dir D [--resume D/epoch=0.ckpt]
        [--out result.pt] [--kill-rank 1 --kill-at-step 12] [--precision bf16-mixed] [--accumulate 2]
        [--clip 1e-3 --momentum 0 --lr 1] [--manual] [--num-nodes 2]
        [--hidden 256 --batch-size 8 --gather-rows 0] [--max-factor-dim 24] [--model frozen] [--strategy ddp]
        [--inf-rank 1 --inf-at-step 5 --inf-steps 3 --max-consecutive-faults 3] [--mode dkfac]
        [--ddp-comm-hook] [--damping-on-rank-1 0.05] [--limit-batches 20] [--damping 1e-4 --no-kl-clip]

Rank 0 writes ``--out``: final parameters, per-step training losses, every rank's K-FAC factors as they
were right after the checkpoint was restored (before any training step), the factor dtype, the number of
K-FAC steps, the largest parameter update of a step, the threads each rank used, whether the parameters
ended identical on every rank, how often each rank's ``--ddp-comm-hook`` ran, and what each rank found
after ``trainer.fit`` returned: the modules that still hold a forward hook, and whether one more forward
and backward pass of the module captured anything for K-FAC or raised.

``--ddp-comm-hook`` gives the strategy a user's DDP communication hook (an all-reduce that counts its
calls); ``--damping-on-rank-1`` gives rank 1 another damping than the other ranks (a misconfigured sweep).
A ``ValueError`` out of ``trainer.fit`` is printed as ``[rank R] ValueError: ...`` before it propagates.

Every rank computes with one thread, whatever the shell sets: Lightning would otherwise give each process
``cpu_count // local_world_size`` threads (one per rank for two devices on one node, two for one device
on each of two nodes), and float sums in another order make runs of different layouts differ.
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
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import lightning_dpkfac
from lightning_dpkfac.tools.data import DigitsDataModule
from lightning_dpkfac.tools.models import ClassifierModule, mlp


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


class ScaleShift(nn.Module):
    """A trainable per-feature scale and shift (adapter tuning): bare parameters, nothing for K-FAC."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def frozen_backbone(hidden: int) -> nn.Module:
    """The digits MLP frozen, with a trainable scale and shift on its hidden features and its logits."""
    backbone = mlp(hidden=(hidden,))
    backbone.requires_grad_(False)
    return nn.Sequential(backbone[:3], ScaleShift(hidden), backbone[3:], ScaleShift(10))


class PoisonBatch(pl.Callback):
    """Multiplies one rank's inputs by inf on ``count`` steps from ``step`` on (corrupt batches)."""

    def __init__(self, rank: int, step: int, count: int) -> None:
        self.rank, self.steps = rank, range(step, step + count)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step in self.steps:
            batch[0].mul_(float("inf"))


DDP_HOOK_CALLS = [0]


def counting_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]
    """A user's DDP communication hook: DDP's own averaging all-reduce, counting its calls. (Unannotated: DDP
    compares the annotations with ``dist.GradBucket``, and this module's postponed annotations are strings.)"""
    DDP_HOOK_CALLS[0] += 1
    return default_hooks.allreduce_hook(state, bucket)


def after_fit(module: nn.Module, pre: lightning_dpkfac.KFACPreconditioner | None) -> dict[str, Any]:
    """What is left of K-FAC on ``module`` after ``trainer.fit``: the modules that still hold a forward hook,
    and what one more training-mode forward and backward pass did to the engine (its state bytes and what
    it says it captures), or the error it raised."""
    hooked = [name for name, m in module.named_modules() if m._forward_hooks]
    if pre is None:
        return {"hooked_modules": hooked}
    before = pre.state_bytes()
    first = next(m for m in module.modules() if isinstance(m, nn.Linear))
    x = torch.randn(4, first.in_features, dtype=first.weight.dtype)
    error = None
    try:
        module.train()
        torch.nn.functional.cross_entropy(module(x), torch.arange(4)).backward()
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = f"{type(e).__name__}: {e}"
    return {"hooked_modules": hooked, "error": error, "state_bytes": (before, pre.state_bytes()),
            "captures": {layer.name: sorted(pre.captures(layer.name)) for layer in pre.layers}}


def factor_dtype(pre: lightning_dpkfac.KFACPreconditioner | None) -> str | None:
    """The dtype of the factors rank 0 holds (``None`` if it holds none)."""
    states = [pre.layer_state(layer.name) for layer in pre.layers] if pre is not None else []
    return next((str(s.dtype) for s in states if s is not None), None)


class Recorder(pl.Callback):
    """Keeps per-step losses and update sizes, the factors at fit start, and kills a rank on request."""

    def __init__(self, kill_rank: int | None, kill_at_step: int | None) -> None:
        self.losses: dict[int, float] = {}
        self.factors_at_start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kill_rank, self.kill_at_step = kill_rank, kill_at_step
        self.max_update_norm = 0.0
        self.row_layers: list[str] = []
        self.finite_params: dict[int, bool] = {}
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, idx: int) -> None:
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pre = getattr(trainer.strategy, "preconditioner", None)
        for layer in pre.layers if pre is not None else []:
            factors = pre.factors(layer.name)
            if factors is not None:
                self.factors_at_start[layer.name] = (factors[0].clone(), factors[1].clone())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pre = getattr(trainer.strategy, "preconditioner", None)
        self.row_layers = pre.row_layers if pre is not None else []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.finite_params[trainer.global_step] = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        update = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(pl_module.parameters(), self._before)])
        self.max_update_norm = max(self.max_update_norm, float(update.norm()))
        if trainer.global_rank == self.kill_rank and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    # Before the launcher reads it (it sets threads only where OMP_NUM_THREADS is unset); the ranks it
    # starts inherit the variable and run this line too.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
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
    p.add_argument("--model", choices=["mlp", "frozen"], default="mlp")
    p.add_argument("--strategy", choices=["dpkfac", "ddp"], default="dpkfac")
    p.add_argument("--inf-rank", type=int, default=None)
    p.add_argument("--inf-at-step", type=int, default=None)
    p.add_argument("--inf-steps", type=int, default=1)
    p.add_argument("--max-consecutive-faults", type=int, default=5)
    p.add_argument("--mode", choices=["dpkfac", "dkfac"], default="dpkfac")
    p.add_argument("--ddp-comm-hook", action="store_true")
    p.add_argument("--damping", type=float, default=1e-2)
    p.add_argument("--overlap", action="store_true", help="overlap_decompositions=True (off on CPU by default)")
    p.add_argument("--no-kl-clip", action="store_true")
    p.add_argument("--damping-on-rank-1", type=float, default=None)
    p.add_argument("--limit-batches", type=int, default=None, help="training batches per epoch (default: all)")
    args = p.parse_args()

    pl.seed_everything(0, workers=True)
    recorder = Recorder(args.kill_rank, args.kill_at_step)
    callbacks: list[pl.Callback] = [recorder, ModelCheckpoint(dirpath=args.ckpt_dir, save_top_k=-1, every_n_epochs=1)]
    if args.inf_rank is not None:
        callbacks.append(PoisonBatch(args.inf_rank, args.inf_at_step, args.inf_steps))
    timeout = timedelta(seconds=args.timeout_s)
    hook = {"ddp_comm_hook": counting_allreduce_hook} if args.ddp_comm_hook else {}
    if args.strategy == "ddp":
        strategy: DDPStrategy = DDPStrategy(timeout=timeout, **hook)
    else:
        # Lightning's launcher starts rank 1 with LOCAL_RANK=1 in its environment (rank 0 has none).
        on_rank_1 = os.environ.get("LOCAL_RANK") == "1"
        damping = args.damping_on_rank_1 if args.damping_on_rank_1 is not None and on_rank_1 else args.damping
        strategy = lightning_dpkfac.DPKFACStrategy(
            # eigen, factors every step and decompositions every 7 (resumes fall between them), not the defaults
            method="eigen", damping=damping, kl_clip=None if args.no_kl_clip else 1e-3, factor_update_steps=1,
            inv_update_steps=7,
            gather_rows=bool(args.gather_rows), max_factor_dim=args.max_factor_dim,
            max_consecutive_faults=args.max_consecutive_faults, mode=args.mode,
            overlap_decompositions=True if args.overlap else "auto", timeout=timeout, **hook,
        )
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy=strategy,
        max_epochs=args.epochs, precision=args.precision, accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_train_batches=args.limit_batches, limit_val_batches=0, deterministic=True,
    )
    module_class = ManualClassifier if args.manual else ClassifierModule
    net = frozen_backbone(args.hidden) if args.model == "frozen" else mlp(hidden=(args.hidden,))
    module = module_class(net, lr=args.lr, momentum=args.momentum)
    error = None
    try:
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=args.batch_size, flatten=True),
                    ckpt_path=args.resume)
    except lightning_dpkfac.KFACNumericalError as e:  # every rank raises it at the same step
        error = str(e)
    except ValueError as e:
        print(f"[rank {trainer.global_rank}] ValueError: {e}", flush=True)
        raise

    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, recorder.factors_at_start)
    gathered_threads: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered_threads, torch.get_num_threads())
    gathered_flushed: list[Any] = [None] * trainer.world_size  # a denormal square is 0 where they are flushed
    dist.all_gather_object(gathered_flushed, float(torch.tensor(1e-20) ** 2) == 0.0)
    gathered_params: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered_params, [p.detach() for p in module.parameters()])
    gathered_hook_calls: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered_hook_calls, DDP_HOOK_CALLS[0])
    pre = getattr(strategy, "preconditioner", None)
    gathered_after_fit: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered_after_fit, after_fit(module, pre))
    if trainer.is_global_zero and args.out is not None:
        torch.save(
            {
                "error": error,
                "finite_params": recorder.finite_params,
                "skipped_steps": pre.faults.skipped_steps if pre is not None else 0,
                "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
                "losses": recorder.losses,
                "factors_at_start": gathered,
                "owners": {l.name: o for l, o in zip(pre.layers, pre.owners)} if pre is not None else {},
                "steps": trainer.global_step,
                "kfac_steps": pre.steps if pre is not None else 0,
                "factor_dtype": factor_dtype(pre),
                "params_identical_on_all_ranks": all(
                    all(torch.equal(a, b) for a, b in zip(gathered_params[0], other)) for other in gathered_params),
                "ddp_hook_calls": gathered_hook_calls,
                "after_fit": gathered_after_fit,
                "max_update_norm": recorder.max_update_norm,
                "row_layers": recorder.row_layers,
                "threads": gathered_threads,
                "denormals_flushed": gathered_flushed,
            },
            args.out,
        )


if __name__ == "__main__":
    main()
    lightning_dpkfac.exit_process(0)
