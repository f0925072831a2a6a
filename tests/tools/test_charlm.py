"""The character-level language model: the standard-library text, its split and windows, the causal Transformer
and the LightningModule that trains it."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_dpkfac.tools.data import (
    CHARS,
    UNKNOWN_ID,
    VOCAB_SIZE,
    CharLMDataModule,
    encode,
    stdlib_sources,
)
from lightning_dpkfac.tools.models import LanguageModelModule, char_transformer


@pytest.fixture(scope="module")
def data() -> CharLMDataModule:
    data = CharLMDataModule(batch_size=8, seq_len=16)
    data.setup("fit")
    return data


def test_the_vocabulary_is_tab_newline_and_printable_ascii_plus_one_unknown_id() -> None:
    assert len(CHARS) == 97 and VOCAB_SIZE == CharLMDataModule().vocab_size == 98
    assert encode("\t\n ~a\x7fé€").tolist() == [0, 1, 2, 96, CHARS.index("a"), UNKNOWN_ID, UNKNOWN_ID, UNKNOWN_ID]


def test_each_files_end_is_validation_text_and_the_rest_training_text(data: CharLMDataModule) -> None:
    again = CharLMDataModule(batch_size=8, seq_len=16)
    again.setup()
    assert torch.equal(again.train_ids, data.train_ids) and torch.equal(again.val_ids, data.val_ids)
    ids = [encode(text) for text in stdlib_sources()]
    cuts = [len(i) - round(0.1 * len(i)) for i in ids]
    # Each file is cut once: its head is training text, its tail validation text, nothing in both.
    assert torch.equal(data.train_ids, torch.cat([i[:cut] for i, cut in zip(ids, cuts)]))
    assert torch.equal(data.val_ids, torch.cat([i[cut:] for i, cut in zip(ids, cuts)]))
    assert len(data.train_ids) + len(data.val_ids) == sum(len(text) for text in stdlib_sources())
    assert 0 <= int(torch.cat([data.train_ids, data.val_ids]).min())
    assert int(torch.cat([data.train_ids, data.val_ids]).max()) < data.vocab_size


def test_a_missing_module_is_named() -> None:
    with pytest.raises(FileNotFoundError, match=r"module 'no_such_module'"):
        stdlib_sources(["json/decoder", "no_such_module"])


def test_training_batches_are_random_windows_with_next_character_targets(data: CharLMDataModule) -> None:
    loader = data.train_dataloader()
    assert len(loader.sampler) == len(data.train_ids) // 16
    x, y = next(iter(loader))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    windows = data.train_ids.unfold(0, 17, 1)  # every window of the training text
    for row in torch.cat([x, y[:, -1:]], dim=1):
        assert (windows == row).all(dim=1).any()
    # The same draws for the same seed and epoch, new ones for the next epoch.
    assert torch.equal(next(iter(data.train_dataloader()))[0], x)
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], x)


def test_validation_reads_consecutive_windows_in_order(data: CharLMDataModule) -> None:
    loader = data.val_dataloader()
    x, y = next(iter(loader))
    assert torch.equal(x.flatten(), data.val_ids[:8 * 16]) and torch.equal(y.flatten(), data.val_ids[1:8 * 16 + 1])
    assert sum(len(batch[0]) for batch in loader) == (len(data.val_ids) - 1) // 16


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_transformer_is_causal(training: bool) -> None:
    torch.manual_seed(0)
    net = char_transformer(seq_len=16).train(training)
    ids = torch.randint(VOCAB_SIZE, (2, 16))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB_SIZE
    with torch.no_grad():
        logits, logits_changed = net(ids), net(changed)
    assert logits.shape == (2, 16, VOCAB_SIZE)
    assert torch.allclose(logits[:, :7], logits_changed[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 7:], logits_changed[:, 7:])


def test_tied_weights_are_one_parameter() -> None:
    tied, untied = char_transformer(tie_weights=True), char_transformer()
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 98 * 64


def test_the_module_trains_and_logs_bits_per_character() -> None:
    # In this process, without a distributed strategy (Lightning's DDP would leave a process group and launcher
    # variables behind for later tests); dpkfac on two ranks: tests/hydra/test_hydra.py, in a subprocess.
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = CharLMDataModule(batch_size=8, seq_len=16)
    module = LanguageModelModule(char_transformer(d_model=32, dim_feedforward=64, seq_len=16), optimizer="adam",
                                 lr=1e-3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3,
                         limit_val_batches=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 3 and math.isfinite(float(metrics["train/loss"]))
    # About log2(98) = 6.6 bits for a barely trained model; bpc is the loss in bits.
    assert 3 < float(metrics["val/bpc"]) < 8
    assert float(metrics["val/bpc"]) == pytest.approx(float(metrics["val/loss"]) / math.log(2))


def test_kfac_covers_every_weight_of_the_language_model_but_the_layer_norms() -> None:
    from lightning_dpkfac import KFACPreconditioner

    for tie in (False, True):
        net = char_transformer(d_model=16, dim_feedforward=32, seq_len=8, tie_weights=tie)
        pre = KFACPreconditioner(net, lr=0.1)
        covered = {id(p) for layer in pre.layers for p in layer.params()}
        left = [name for name, p in net.named_parameters() if id(p) not in covered]
        assert left and all("norm" in name for name in left), left
        embeddings = [layer.name for layer in pre.layers if layer.diagonal_a]
        assert embeddings == (["position"] if tie else ["embed", "position"])
