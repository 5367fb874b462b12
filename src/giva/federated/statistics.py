"""The setup round's maths: a client's gradient statistics of its shard, and the bases they add up to.

For one adapted block ``W_j`` (``out x in``) and calibration batch ``b`` of ``n_b`` examples, let
``G_b = dL_b/dW_j`` be the gradient of the batch's mean loss at the pretrained model. A client
holding batches ``b in c`` sends, per block, either

* ``dense``:  ``S_c = sum_b n_b G_b`` (``out x in``, float64), or
* ``sketch``: ``Y_c = S_c^T Omega_j`` (``in x k``, float32), with ``Omega_j`` (``out x k``) a Gaussian
  test matrix drawn from (seed, layer, block), so every client draws the same one,

and its example count ``n_c = sum_b n_b``. Both are linear in ``S``, so the server's sums
``sum_c S_c`` and ``sum_c Y_c`` are exactly what one process would compute over the union of the
shards, and ``G = sum_c S_c / sum_c n_c`` is the gradient of the mean loss over all calibration
examples. The server then takes ``A`` = the top-``r`` right singular vectors of ``G`` (dense) or the
top-``r`` left singular vectors of ``Y = G^T Omega`` (sketch: one pass, the range of ``G^T`` seen
through ``k = r + oversample`` random directions). ``B`` is seeded (variants ``Vr`` / ``VrUrand``),
so only ``A`` goes back to the clients.

Float64 sums of float32 gradients are exact for a handful of terms, so the dense path gives the
one-process bases bit for bit whatever the order the clients' sums arrive in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..bases import SEEDED_B_VARIANTS, bases_from_gradient, layer_generator, top_singular_vectors
from ..config import GivaConfig
from ..gradients import compute_gradients, giva_layers
from ..layer import Block, GivaLayer

Mode = Literal["sketch", "dense"]
MODES: tuple[str, ...] = ("sketch", "dense")
ADAPTER = "default"
# Offset of the sketch's seed so Omega never reuses the stream that draws B.
SKETCH_SEED_OFFSET = 7_919


@dataclass(frozen=True)
class BlockSpec:
    """Where one adapted block sits: its layer, block, shape and rank."""

    key: str  # "<layer name>#<block index>", the name the block's tensors travel under
    layer_name: str
    block: Block
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.block.out_size, self.in_features)


def block_specs(model: nn.Module, adapter_name: str = ADAPTER) -> dict[str, BlockSpec]:
    """Every adapted block of the model's GiVA layers, keyed ``layer#block``, in module order."""
    specs: dict[str, BlockSpec] = {}
    for name, layer in giva_layers(model).items():
        for blk in layer.blocks.get(adapter_name, []):
            specs[f"{name}#{blk.index}"] = BlockSpec(f"{name}#{blk.index}", name, blk, layer.in_features)
    if not specs:
        raise ValueError(f"the model has no GiVA adapter {adapter_name!r}")
    return specs


def sketch_width(spec: BlockSpec, oversample: int) -> int:
    """Columns ``k`` of the test matrix: ``r + oversample``, at most the block's smaller side."""
    return min(spec.block.rank + oversample, *spec.shape)


def test_matrix(spec: BlockSpec, seed: int, oversample: int) -> torch.Tensor:
    """``Omega_j`` (``out x k``, float64 Gaussian): a function of (seed, layer, block) only."""
    generator = layer_generator(seed + SKETCH_SEED_OFFSET, spec.layer_name, spec.block.index)
    return torch.randn(spec.block.out_size, sketch_width(spec, oversample), generator=generator, dtype=torch.float64)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping) and "labels" in batch:
        return int(batch["labels"].shape[0])
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    raise ValueError("calibration batches must be dicts with 'labels' or 'input_ids' to count their examples")


def client_statistics(
    peft_model: nn.Module,
    batches: Iterable[Any],
    mode: str,
    seed: int,
    oversample: int = 8,
) -> tuple[dict[str, torch.Tensor], int]:
    """One client's summed statistics of its calibration batches, and its example count.

    The gradient is taken at the pretrained model (adapters disabled), one batch at a time;
    ``dense`` returns ``sum_b n_b G_b`` per block (float64), ``sketch`` ``(sum_b n_b G_b)^T Omega``
    (``in x k``, float32).
    """
    if mode not in MODES:
        raise ValueError(f"statistics mode must be one of {MODES}, got {mode!r}")
    specs = block_specs(peft_model)
    layers: dict[str, GivaLayer] = {s.layer_name: giva_layers(peft_model)[s.layer_name] for s in specs.values()}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    with peft_model.disable_adapter():
        for batch in batches:
            n_b = _batch_size(batch)
            gradients, _ = compute_gradients(peft_model, layers, [batch], num_batches=1, progress=False)
            for key, spec in specs.items():
                rows = slice(spec.block.out_start, spec.block.out_start + spec.block.out_size)
                term = gradients[spec.layer_name][rows].double() * n_b
                sums[key] = term if key not in sums else sums[key] + term
            count += n_b
    if count == 0:
        raise ValueError("the client has no calibration batches")
    if mode == "dense":
        return sums, count
    return {key: (s.mT @ test_matrix(specs[key], seed, oversample)).float() for key, s in sums.items()}, count


def combine_statistics(parts: list[tuple[dict[str, torch.Tensor], int]]) -> tuple[dict[str, torch.Tensor], int]:
    """Add the clients' statistics (each already weighted by its examples) and their counts."""
    if not parts:
        raise ValueError("no client statistics to combine")
    keys = set(parts[0][0])
    total: dict[str, torch.Tensor] = {}
    for index, (stats, _) in enumerate(parts):
        if set(stats) != keys:
            raise ValueError(f"client statistics {index} cover blocks {sorted(set(stats) ^ keys)[:3]} that others do not")
        for key, value in stats.items():
            total[key] = value.clone() if key not in total else total[key] + value
    return total, sum(count for _, count in parts)


def bases_from_statistics(
    specs: dict[str, BlockSpec], statistics: dict[str, torch.Tensor], count: int, mode: str, config: GivaConfig
) -> dict[str, torch.Tensor]:
    """The input basis ``A_j`` (``r x in``, float32) of every block from the combined statistics."""
    if config.variant not in SEEDED_B_VARIANTS or config.variant == "random":
        raise ValueError(
            f"federated GiVA sends only A, so B must be seeded: GivaConfig.variant must be 'Vr' or 'VrUrand', "
            f"got {config.variant!r}"
        )
    bases: dict[str, torch.Tensor] = {}
    for key, spec in specs.items():
        stat = statistics[key]
        if mode == "dense":
            gradient = (stat / count).float()  # out x in: the mean-loss gradient over the union
            generator = layer_generator(config.seed, spec.layer_name, spec.block.index)
            a, _ = bases_from_gradient(gradient, spec.block.rank, config.variant, generator, svd=config.svd, svd_seed=config.seed)
        else:
            # stat = G^T Omega (in x k); its top-r left singular vectors span G's top row space.
            _, _, v = top_singular_vectors(stat.float().mT, spec.block.rank, method="exact")
            a = v.mT.contiguous()
        bases[key] = a
    return bases


def apply_bases(peft_model: nn.Module, bases: dict[str, torch.Tensor]) -> None:
    """Write each block's ``A`` into the model; its seeded ``B`` (built with the layer) is kept."""
    specs = block_specs(peft_model)
    missing = sorted(set(specs) - set(bases))
    if missing:
        raise ValueError(f"bases are missing for blocks {missing[:3]} (of {len(missing)})")
    layers = giva_layers(peft_model)
    for key, spec in specs.items():
        layer = layers[spec.layer_name]
        blk = spec.block
        b = layer.giva_B[ADAPTER][blk.row_offset : blk.row_offset + blk.out_size, blk.rank_offset : blk.rank_offset + blk.rank]
        layer.set_block_bases(ADAPTER, blk, bases[key].to(b.device), b.clone())


def read_bases(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Each block's current ``A`` (what a client holds), keyed like :func:`block_specs`."""
    layers = giva_layers(peft_model)
    return {
        key: layers[spec.layer_name].giva_A[ADAPTER][spec.block.rank_offset : spec.block.rank_offset + spec.block.rank]
        .detach()
        .clone()
        for key, spec in block_specs(peft_model).items()
    }


def one_process_bases(
    peft_model: nn.Module, batches: Iterable[Any], mode: str, config: GivaConfig, oversample: int = 8
) -> dict[str, torch.Tensor]:
    """The bases a single process computes from all ``batches`` (the union of the shards): the reference."""
    stats, count = client_statistics(peft_model, batches, mode, config.seed, oversample)
    return bases_from_statistics(block_specs(peft_model), stats, count, mode, config)
