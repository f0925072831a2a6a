"""Built-in shape tables of models too big to build here: what the planner needs, no weights.

A table lists the K-FAC-covered layers in registration order as ``(name, LayerShape(d_a, d_g))``
(``d_a`` = inputs x kernel size, +1 with a bias; ``d_g`` = outputs), and ``other_params``, the number
of parameters that keep their plain gradient (normalisation layers, embeddings). Float32 parameters.
Row gathering (:mod:`lightning_dpkfac.distributed.rows`) is modelled for ResNet-50's classifier only; the token
models' Linear layers see B x T rows, far more than their gradient at any practical batch.

- ``resnet50``: torchvision's ResNet-50 v1.5 for ImageNet (53 bias-free convolutions + the 1000-way
  classifier = 54 K-FAC layers; batch-norm affine parameters are the rest): 25,557,032 parameters.
- ``bert-base``: BERT-base (uncased) encoder and pooler, no task head: 12 layers of Q, K, V, O
  (768 -> 768), feed-forward 768 -> 3072 -> 768, all with biases, and the pooler (73 K-FAC layers);
  embeddings (30,522-word vocabulary, 512 positions, 2 token types) and LayerNorms are the rest:
  109,482,240 parameters.
- ``transformer``: the base Transformer of Vaswani et al. (2017), the sequence-to-sequence model of the
  DP-KFAC line of work: d_model 512, 8 heads, d_ff 2048, 6 encoder and 6 decoder layers, separate Q, K,
  V, O projections with biases, and the output projection to the target vocabulary (97 K-FAC layers).
  The vocabulary sizes are an assumption (10,000 source and target tokens, the order of Multi30k's);
  pass others to :func:`transformer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from lightning_dpkfac.core.blocks import block_name, cut_layers
from lightning_dpkfac.distributed.assignment import LayerShape


@dataclass(frozen=True)
class ModelShapes:
    """What the cost model needs to know of a model.

    Attributes:
        name: a label for reports.
        layers: the K-FAC layers in registration order, as ``(name, LayerShape)``.
        other_params: parameters that require grad but are not in a K-FAC layer (N_o).
        element_size: bytes per parameter element, ``e`` (4 for float32).
    """

    name: str
    layers: tuple[tuple[str, LayerShape], ...]
    other_params: int
    element_size: int = 4

    def split(self, max_factor_dim: int | str | None, world_size: int = 1, inv_update_steps: int = 10) -> ModelShapes:
        """The table with each layer split into blocks as the engine splits it on ``world_size`` ranks
        (``KFACConfig.max_factor_dim``, ``inv_update_steps``)."""
        layers = []
        for (name, shape), blocks in zip(self.layers, cut_layers(self.shapes, max_factor_dim, world_size,
                                                                  inv_update_steps)):
            if len(blocks) == 1:
                layers.append((name, shape))
                continue
            layers += [(block_name(name, b), LayerShape(b.d_a, b.d_g, shape.rows_per_example)) for b in blocks]
        return dataclasses.replace(self, layers=tuple(layers))

    @property
    def shapes(self) -> list[LayerShape]:
        return [shape for _, shape in self.layers]

    @property
    def covered_params(self) -> int:
        """N: parameters of the K-FAC layers, sum of d_g * d_a (weights and biases)."""
        return sum(s.d_g * s.d_a for s in self.shapes)

    @property
    def factor_elements(self) -> int:
        """F: elements of all Kronecker factors, sum of d_a^2 + d_g^2."""
        return sum(s.d_a**2 + s.d_g**2 for s in self.shapes)

    @property
    def factor_element_size(self) -> int:
        """Bytes per factor element: float32 for float32/bf16/fp16 models, float64 for float64 models."""
        return max(4, self.element_size)


def _bottleneck_resnet(name: str, blocks: tuple[int, ...], num_classes: int = 1000) -> ModelShapes:
    """A torchvision bottleneck ResNet (expansion 4): convolutions without bias, each followed by a
    batch norm (2 parameters per channel), a biased classifier."""
    layers: list[tuple[str, LayerShape]] = [("conv1", LayerShape(3 * 7 * 7, 64))]
    bn = 2 * 64
    in_ch = 64
    for stage, count in enumerate(blocks, start=1):
        width = 64 * 2 ** (stage - 1)
        out_ch = 4 * width
        for block in range(count):
            prefix = f"layer{stage}.{block}"
            layers += [
                (f"{prefix}.conv1", LayerShape(in_ch, width)),
                (f"{prefix}.conv2", LayerShape(width * 9, width)),
                (f"{prefix}.conv3", LayerShape(width, out_ch)),
            ]
            bn += 2 * (width + width + out_ch)
            if block == 0:
                layers.append((f"{prefix}.downsample.0", LayerShape(in_ch, out_ch)))
                bn += 2 * out_ch
            in_ch = out_ch
    layers.append(("fc", LayerShape(in_ch + 1, num_classes, rows_per_example=1)))
    return ModelShapes(name, tuple(layers), other_params=bn)


def resnet50() -> ModelShapes:
    """ResNet-50 (torchvision, ImageNet): 54 K-FAC layers, N = 25,503,912, N_o = 53,120."""
    return _bottleneck_resnet("ResNet-50", (3, 4, 6, 3))


def _attention(prefix: str, d_model: int) -> list[tuple[str, LayerShape]]:
    return [(f"{prefix}.{p}", LayerShape(d_model + 1, d_model)) for p in ("query", "key", "value", "out")]


def bert_base(vocab: int = 30522, positions: int = 512, token_types: int = 2) -> ModelShapes:
    """BERT-base encoder and pooler: 73 K-FAC layers; embeddings and LayerNorms keep plain gradients."""
    d, d_ff, depth = 768, 3072, 12
    layers: list[tuple[str, LayerShape]] = []
    for i in range(depth):
        prefix = f"encoder.layer.{i}"
        layers += _attention(f"{prefix}.attention", d)
        layers += [(f"{prefix}.intermediate", LayerShape(d + 1, d_ff)), (f"{prefix}.output", LayerShape(d_ff + 1, d))]
    layers.append(("pooler", LayerShape(d + 1, d)))
    embeddings = (vocab + positions + token_types) * d
    layer_norms = 2 * d * (1 + 2 * depth)  # the embeddings' and two per layer
    return ModelShapes("BERT-base", tuple(layers), other_params=embeddings + layer_norms)


def transformer(src_vocab: int = 10_000, tgt_vocab: int = 10_000) -> ModelShapes:
    """The base Transformer (Vaswani et al., 2017), 6 + 6 layers: 97 K-FAC layers; embeddings and
    LayerNorms keep plain gradients."""
    d, d_ff, depth = 512, 2048, 6

    def feed_forward(prefix: str) -> list[tuple[str, LayerShape]]:
        return [(f"{prefix}.linear1", LayerShape(d + 1, d_ff)), (f"{prefix}.linear2", LayerShape(d_ff + 1, d))]

    layers: list[tuple[str, LayerShape]] = []
    for i in range(depth):
        layers += _attention(f"encoder.{i}.self_attn", d) + feed_forward(f"encoder.{i}")
    for i in range(depth):
        layers += _attention(f"decoder.{i}.self_attn", d) + _attention(f"decoder.{i}.cross_attn", d)
        layers += feed_forward(f"decoder.{i}")
    layers.append(("generator", LayerShape(d + 1, tgt_vocab)))
    layer_norms = 2 * d * (2 * depth + 3 * depth + 2)  # 2 per encoder layer, 3 per decoder layer, 2 final
    return ModelShapes("Transformer-base", tuple(layers), other_params=(src_vocab + tgt_vocab) * d + layer_norms)


BUILTIN: dict[str, Callable[[], ModelShapes]] = {
    "resnet50": resnet50,
    "bert-base": bert_base,
    "transformer": transformer,
}
