"""The setup round's maths: a client's gradient statistics of its shard, and the bases they add up to.

Two modes, both additive across clients so the server's sum is what one process computes over the
union of the shards:

* ``sketch`` (default): H3's pass-based protocol (:mod:`giva.init`). The server holds an
  ``InitSession``; each pass it asks for ``G^T M`` (``in x l``) or ``G M`` (``out x l``) summed over the
  client's calibration batches (:func:`giva.init.accumulate`), adds the clients' ``Partial`` sums and
  feeds the total to ``session.receive``. The first pass's test matrices are seeded by (seed, target),
  so the clients build them themselves; later passes' matrices depend on the data and are sent.
  ``receive`` uses the sum over batches (the bases ignore its scale); the calibration batches are all
  full (``batch_size`` examples), so weighting by batches is weighting by examples.
* ``dense``: per block ``S_c = sum_b n_b G_b`` (``out x in``, float64), with ``G_b`` the gradient of
  batch ``b``'s mean loss and ``n_b`` its examples; the server takes ``G = sum_c S_c / sum_c n_c`` and
  its SVD. Float64 sums of a handful of float32 gradients are exact, so the bases of a float32 or
  bfloat16 model are the one-process ones bit for bit whatever order the clients' sums arrive in (the
  float32 sums of ``giva.init``'s exact mode would differ in the last bits). An fp16 model's ``G_b``
  depends on the loss scale its client's earlier batches left (:class:`giva.init.LossScale`): once a
  batch overflows, they are equal to fp16 rounding only.

``B`` is seeded (variants ``Vr`` / ``VrUrand``), so only ``A`` goes back to the clients.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..bases import SEEDED_B_VARIANTS, gradient_bases, layer_generator, numerical_rank
from ..config import GivaConfig
from ..init import (
    InitSession,
    LossScale,
    Partial,
    Request,
    RequestItem,
    check_gradient_sum,
    compute_gradients,
    giva_configs,
    giva_layers,
    targets_of,
)
from ..init.session import rank_message
from ..layer import Block, GivaLayer

logger = logging.getLogger(__name__)

Mode = Literal["sketch", "dense"]
MODES: tuple[str, ...] = ("sketch", "dense")
ADAPTER = "default"


@dataclass(frozen=True)
class BlockSpec:
    """Where one adapted block sits: its layer, block, shape and rank."""

    key: str  # "default:<layer name>#<block index>" (giva.init's Target.key), the name its tensors travel under
    layer_name: str
    block: Block
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.block.out_size, self.in_features)


def block_specs(model: nn.Module, adapter_name: str = ADAPTER) -> dict[str, BlockSpec]:
    """Every adapted block of the model's GiVA layers, keyed like ``giva.init.Target.key``, in module order."""
    specs: dict[str, BlockSpec] = {}
    for name, layer in giva_layers(model).items():
        for blk in layer.blocks.get(adapter_name, []):
            key = f"{adapter_name}:{name}#{blk.index}"
            specs[key] = BlockSpec(key, name, blk, layer.in_features)
    if not specs:
        raise ValueError(f"the model has no GiVA adapter {adapter_name!r}")
    return specs


def bases_layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """How the ``A`` of every block is packed: ``(key, (r, in))`` in block order."""
    return [(key, (s.block.rank, s.in_features)) for key, s in block_specs(model).items()]


def dense_layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """How dense statistics are packed: ``(key, (out, in))`` in block order."""
    return [(key, s.shape) for key, s in block_specs(model).items()]


def matrix_layout(session: InitSession, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    """Shapes of a pass's test matrices: ``M`` is ``out x l`` for ``G^T M`` (kind ``gt``), ``in x l`` for ``G M``."""
    return [(k, (t.out_size if kind == "gt" else t.in_features, session.width(k))) for k, t in session.targets.items()]


def sums_layout(session: InitSession, kind: str) -> list[tuple[str, tuple[int, ...]]]:
    """Shapes of a pass's sums: ``in x l`` for ``G^T M``, ``out x l`` for ``G M``."""
    return [(k, (t.in_features if kind == "gt" else t.out_size, session.width(k))) for k, t in session.targets.items()]


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Mapping) and "labels" in batch:
        return int(batch["labels"].shape[0])
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    raise ValueError("calibration batches must be dicts with 'labels' or 'input_ids' to count their examples")


def dense_statistics(peft_model: nn.Module, batches: Iterable[Any]) -> tuple[dict[str, torch.Tensor], int]:
    """One client's ``sum_b n_b G_b`` per block (``out x in``, float64) and its example count ``sum_b n_b``.

    Each ``G_b`` is taken at the pretrained model (adapters disabled), one batch at a time, all with one fp16 loss scale
    (:class:`giva.init.LossScale`): a later batch starts where the earlier ones left it (halved on an overflow, grown
    back after ``GROWTH_INTERVAL`` clean batches), as the sketch's passes do, instead of at the start again.
    """
    specs = block_specs(peft_model)
    layers: dict[str, GivaLayer] = {s.layer_name: giva_layers(peft_model)[s.layer_name] for s in specs.values()}
    sums: dict[str, torch.Tensor] = {}
    count = 0
    scale = LossScale()
    with peft_model.disable_adapter():
        for batch in batches:
            n_b = _batch_size(batch)
            gradients, _ = compute_gradients(peft_model, layers, [batch], num_batches=1, progress=False, scale=scale)
            for key, spec in specs.items():
                rows = slice(spec.block.out_start, spec.block.out_start + spec.block.out_size)
                term = gradients[spec.layer_name][rows].double() * n_b
                sums[key] = term if key not in sums else sums[key] + term
            count += n_b
    if count == 0:
        raise ValueError("the client has no calibration batches")
    return sums, count


def combine_statistics(parts: list[tuple[dict[str, torch.Tensor], int]]) -> tuple[dict[str, torch.Tensor], int]:
    """Add the clients' dense statistics (each already weighted by its examples) and their counts."""
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


def _check_seeded(config: GivaConfig) -> None:
    if config.variant not in SEEDED_B_VARIANTS or config.variant == "random":
        raise ValueError(
            f"federated GiVA sends only A, so B must be seeded: GivaConfig.variant must be 'Vr' or 'VrUrand', "
            f"got {config.variant!r}"
        )


def dense_bases(
    specs: dict[str, BlockSpec], statistics: dict[str, torch.Tensor], count: int, config: GivaConfig
) -> dict[str, torch.Tensor]:
    """The input basis ``A_j`` (``r x in``, float32) of every block from the summed dense statistics; a block whose
    gradient has fewer non-zero singular values than its rank is logged as a warning (as ``giva.initialize`` warns)."""
    _check_seeded(config)
    bases: dict[str, torch.Tensor] = {}
    deficient: dict[tuple[str, int], tuple[int, int]] = {}
    for key, spec in specs.items():
        check_gradient_sum(statistics[key], spec.layer_name, spec.block.index)  # as one process's exact mode does
        gradient = (statistics[key] / count).float()  # out x in: the mean-loss gradient over the union
        generator = layer_generator(config.seed, spec.layer_name, spec.block.index)
        bases[key], _, values = gradient_bases(gradient, spec.block.rank, config.variant, generator, config.svd, config.seed)
        found = numerical_rank(values, tuple(gradient.shape))
        if found < spec.block.rank:
            deficient[(spec.layer_name, spec.block.index)] = (found, spec.block.rank)
    if (message := rank_message(deficient)) is not None:
        logger.warning(message)
    return bases


def sketch_session(peft_model: nn.Module, passes: int, oversampling: int) -> InitSession:
    """The sketch session of the model's GiVA adapter; the same requests in every process with the same model."""
    configs = giva_configs(peft_model)
    for config in configs.values():
        _check_seeded(config)
    return InitSession(targets_of(peft_model, configs), mode="sketch", passes=passes, oversampling=oversampling)


def client_request(session: InitSession, pass_index: int, kind: str, matrices: dict[str, torch.Tensor]) -> Request:
    """The request of pass ``pass_index`` on a client: its own seeded first pass, else the server's matrices."""
    if pass_index == 0:
        return session.next_request()
    missing = sorted(set(session.targets) - set(matrices))
    if missing:
        raise ValueError(f"the server's pass {pass_index} request has no test matrix for {missing[:3]}")
    items = {
        key: RequestItem(t.layer, t.out_start, t.out_size, kind, matrices[key])  # type: ignore[arg-type]
        for key, t in session.targets.items()
    }
    return Request(pass_index, session.passes, items)


def add_partials(parts: list[Partial]) -> Partial:
    """The clients' partial sums of one pass, added (sums, batch and token counts)."""
    if not parts:
        raise ValueError("no client partials to add")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


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
    record_bases_info(peft_model)


def record_bases_info(peft_model: nn.Module) -> None:
    """Note in the adapter's config that its bases came from a federated setup, with the dtype ``A`` is stored in."""
    stored = {str(layer.giva_A[ADAPTER].dtype).removeprefix("torch.") for layer in giva_layers(peft_model).values()
              if ADAPTER in layer.giva_A}
    config = giva_configs(peft_model)[ADAPTER]
    config.bases_info = {"source": "gradient", "setup": "federated", "variant": config.variant, "seed": config.seed,
                         "dtype": "/".join(sorted(stored))}


def read_bases(peft_model: nn.Module, name: str = "giva_A") -> dict[str, torch.Tensor]:
    """Each block's current ``A`` (or ``B`` with ``name="giva_B"``), keyed like :func:`block_specs`."""
    layers = giva_layers(peft_model)
    out = {}
    for key, spec in block_specs(peft_model).items():
        blk = spec.block
        full = getattr(layers[spec.layer_name], name)[ADAPTER]
        ranks = slice(blk.rank_offset, blk.rank_offset + blk.rank)
        out[key] = (full[ranks] if name == "giva_A" else full[blk.row_offset : blk.row_offset + blk.out_size, ranks])
        out[key] = out[key].detach().clone()
    return out


def one_process_dense_bases(peft_model: nn.Module, batches: Iterable[Any], config: GivaConfig) -> dict[str, torch.Tensor]:
    """The dense-mode bases a single process computes from all ``batches`` (the union of the shards)."""
    stats, count = dense_statistics(peft_model, batches)
    return dense_bases(block_specs(peft_model), stats, count, config)
