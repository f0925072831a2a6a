"""A 2-rank dpkfac fit of a small MLP on fixed random data, written against either Lightning namespace:
``lightning.pytorch`` or the separate ``pytorch_lightning`` package.

    python tests/scripts/fit_namespace.py --namespace pytorch_lightning --out result.pt

Rank 0 writes ``--out``: the strategy's class, the final parameters and the number of K-FAC steps.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"  # the same float summation order in every run
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--namespace", choices=["lightning.pytorch", "pytorch_lightning"], required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    pl = importlib.import_module(args.namespace)
    import lightning_dpkfac  # after pl: registers "dpkfac" with pytorch_lightning's registry too

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 12, generator=g), torch.randint(0, 3, (256,), generator=g))
    module = Classifier()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="dpkfac", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=16))
    if trainer.is_global_zero:
        strategy = trainer.strategy
        torch.save({"strategy": f"{type(strategy).__module__}.{type(strategy).__qualname__}",
                    "kfac_steps": strategy.preconditioner.steps,
                    "params": {k: v.detach().clone() for k, v in module.state_dict().items()}}, args.out)


if __name__ == "__main__":
    main()
    from lightning_dpkfac import exit_process

    exit_process(0)
