"""Bad configuration fails early with a message naming the parameter, the value and the allowed range."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dpkfac import DPKFACStrategy, KFACConfig, KFACPreconditioner, UnsupportedLayerError


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"damping": 0.0}, r"damping=0.0 is invalid: it must be a number > 0"),
        ({"damping": -1e-3}, r"damping=-0.001 is invalid"),
        ({"factor_decay": 1.0}, r"factor_decay=1.0 is invalid: it must be a number in \[0, 1\)"),
        ({"factor_decay": -0.1}, r"factor_decay=-0.1 is invalid"),
        ({"kl_clip": 0.0}, r"kl_clip=0.0 is invalid: it must be None or a number > 0"),
        ({"factor_update_steps": 0}, r"factor_update_steps=0 is invalid: it must be an integer >= 1"),
        ({"method": "cholesky"}, r"method='cholesky' is invalid: it must be one of \('eigen', 'inverse'\)"),
        ({"mode": "kaisa"}, r"mode='kaisa' is invalid: it must be one of \('dpkfac', 'dkfac'\)"),
        ({"kfac_bucket_cap_mb": 0}, r"kfac_bucket_cap_mb=0 is invalid"),
        ({"gather_rows": "yes"}, r"gather_rows='yes' is invalid: it must be True or False"),
        ({"flush_denormal": "auto"}, r"flush_denormal='auto' is invalid: it must be True or False"),
    ],
)
def test_invalid_hyper_parameter_raises_value_error_naming_it(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KFACConfig(**changes)


def test_strategy_validates_hyper_parameters_at_construction() -> None:
    with pytest.raises(ValueError, match=r"damping=-1 is invalid"):
        DPKFACStrategy(damping=-1)


def test_preconditioner_validates_hyper_parameters_at_construction() -> None:
    with pytest.raises(ValueError, match=r"factor_decay=2 is invalid"):
        KFACPreconditioner(nn.Linear(2, 2), factor_decay=2)


def test_schedule_returning_an_invalid_value_is_named_with_its_step() -> None:
    layer = nn.Linear(3, 2)
    pre = KFACPreconditioner(layer, damping=lambda step: 1e-3 if step < 1 else -1.0, kl_clip=None)
    for _ in range(2):
        F.mse_loss(layer(torch.randn(4, 3)), torch.randn(4, 2)).backward()
        if pre.steps == 1:
            with pytest.raises(ValueError, match=r"damping=-1.0 \(returned by its schedule at step 1\)"):
                pre.step()
        else:
            pre.step()


def test_schedules_are_evaluated_at_each_step() -> None:
    config = KFACConfig(damping=lambda step: 0.1 / (step + 1), lr=lambda step: 0.5)
    assert config.value("damping", 0) == pytest.approx(0.1)
    assert config.value("damping", 4) == pytest.approx(0.02)
    assert config.value("lr", 3) == 0.5


def test_grouped_conv_is_refused_naming_the_layer_and_the_fix() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten())
    with pytest.raises(UnsupportedLayerError, match=r"Layer '0' is a Conv2d with groups=2.*skip_layers"):
        KFACPreconditioner(model)


def test_skipped_and_frozen_layers_keep_their_plain_gradient() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    model[3].bias.requires_grad_(False)
    pre = KFACPreconditioner(model, skip_layers=["0"], kl_clip=None)
    assert [layer.name for layer in pre.layers] == ["2"]
    assert set(pre.skipped) == {"0", "3"}
    F.cross_entropy(model(torch.randn(5, 2, 4, 4)), torch.randint(0, 2, (5,))).backward()
    plain = model[0].weight.grad.clone()
    pre.step()
    assert torch.equal(model[0].weight.grad, plain)
    assert model[3].weight.grad is None


def test_skip_layers_naming_no_module_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"skip_layers names \['encoder'\], which match no module"):
        KFACPreconditioner(nn.Sequential(nn.Linear(2, 2)), skip_layers=["encoder"])


def test_kl_clip_without_a_learning_rate_says_how_to_give_one() -> None:
    layer = nn.Linear(3, 2)
    pre = KFACPreconditioner(layer, kl_clip=1e-3)
    F.mse_loss(layer(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    with pytest.raises(ValueError, match=r"kl_clip needs a learning rate: pass lr="):
        pre.step()


def test_misspelt_keyword_is_refused_with_the_closest_name() -> None:
    with pytest.raises(ValueError, match=r"'dampng' is not a parameter of DPKFACStrategy. Did you mean 'damping'\?"):
        DPKFACStrategy(dampng=1e-3)
    with pytest.raises(ValueError, match=r"'inv_update_step' is not a parameter of KFACConfig. Did you mean"):
        KFACPreconditioner(nn.Linear(2, 2), inv_update_step=5)


def test_strategy_names_resolve_to_the_two_modes() -> None:
    import lightning.pytorch as pl

    for name in ("dpkfac", "dkfac"):
        trainer = pl.Trainer(strategy=name, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False)
        assert isinstance(trainer.strategy, DPKFACStrategy)
        assert trainer.strategy.kfac_config.mode == name


def test_strategy_splits_kfac_and_ddp_keyword_arguments() -> None:
    strategy = DPKFACStrategy(damping=3e-3, inv_update_steps=20, find_unused_parameters=True)
    assert strategy.kfac_config.damping == 3e-3 and strategy.kfac_config.inv_update_steps == 20
    assert strategy._ddp_kwargs == {"find_unused_parameters": True}


def test_kfac_layers_split_over_two_optimizers_are_refused() -> None:
    from lightning_dpkfac.lightning.callback import check_optimizers

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    pre = KFACPreconditioner(model)
    optimizers = [torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[1].parameters(), lr=0.1)]
    with pytest.raises(ValueError, match=r"split over optimizers \[0, 1\]"):
        check_optimizers(optimizers, pre)


def test_kl_clip_with_groups_of_different_lr_asks_for_an_explicit_lr() -> None:
    from lightning_dpkfac.lightning.callback import check_optimizers

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    groups = [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters(), "lr": 0.01}]
    with pytest.raises(ValueError, match=r"different learning rates \[0.01, 0.1\].*pass lr=\.\.\. to the strategy"):
        check_optimizers([torch.optim.SGD(groups)], KFACPreconditioner(model))
    check_optimizers([torch.optim.SGD(groups)], KFACPreconditioner(model, lr=0.1))  # explicit lr: fine


def _denormals_flushed() -> bool:
    """Whether this process flushes denormal floats: (1e-20)^2 = 1e-40 is one in float32."""
    return float(torch.tensor(1e-20) ** 2) == 0.0


def test_an_engine_on_cpu_flushes_denormal_floats_unless_told_not_to() -> None:
    torch.set_flush_denormal(False)
    kept = KFACPreconditioner(nn.Linear(4, 3), lr=0.1, flush_denormal=False)
    assert not _denormals_flushed() and "denormal floats kept:" in kept.describe()
    flushed = KFACPreconditioner(nn.Linear(4, 3), lr=0.1)
    assert _denormals_flushed()  # left on: what every engine of this session sets by default
    assert "denormal floats flushed to zero:" in flushed.describe()
