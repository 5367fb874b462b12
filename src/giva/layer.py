"""The GiVA adapter maths on one linear map (nn.Linear or transformers' Conv1D, fused or not).

For every adapted output block ``j`` of ``W`` (``out_j x in``)::

    y_j = W_j x + lambda_o_j * (B_j (lambda_s_j * (A_j dropout(x))))
    delta_W_j = diag(lambda_o_j) B_j diag(lambda_s_j) A_j

The blocks of one adapter are stored stacked: ``A`` is ``R x in`` (the ``A_j`` one under
another, ``R = sum r_j``), ``B`` is ``O x R`` block-diagonal (``O = sum out_j``), ``lambda_s``
has ``R`` entries and ``lambda_o`` has ``O``. A plain linear layer is the one-block case. When
only some blocks of a fused layer are adapted, ``giva_out_index`` lists the ``O`` output rows
they occupy in ``W``.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import warnings
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn

try:  # FSDP2's sharded tensors; a torch built without torch.distributed has none (isinstance(x, ()) is False)
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]

from .bases import (
    bases_from_weight,
    layer_generator,
    max_rank,
    random_bases,
    seeded_output_basis,
)
from .config import GivaConfig
from .precision import autocast_enabled, outside_autocast
from .serving import (
    SharedBufferDict,
    _OnDevice,
    basis_storage_dtype,
    check_mixed_batch_args,
    is_shareable,
    mixed_batch_forward,
    outside_inference_mode,
)


def values_crc32(tensor: torch.Tensor, crc: int = 0) -> int:
    """CRC32 of a tensor's values as float32 bytes (on the CPU; a CPU fp32 tensor is read as it is), chained onto
    ``crc``: a checkpoint's checksum of the seeded bases it omits (in fp32, whatever their storage dtype), and what
    :meth:`GivaLayer.unmodified_seeded_bases` remembers of them."""
    return zlib.crc32(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), crc)


_GATHERING = contextvars.ContextVar("giva_gathering_sharded_vectors", default=False)


@contextlib.contextmanager
def _gathering_sharded_vectors() -> Iterator[None]:
    """Inside: :func:`_whole` may gather sharded vectors (a merge or unmerge, which every rank runs)."""
    token = _GATHERING.set(True)
    try:
        yield
    finally:
        _GATHERING.reset(token)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a ``DTensor`` (a vector FSDP2 shards between forwards) gathered inside a merge or unmerge
    (a collective: every rank merges), anything else as it is. Elsewhere (an export, ``get_delta_weight`` called on one
    rank) a gather would wait for the other ranks forever: it raises instead."""
    if not isinstance(tensor, DTensor):
        return tensor
    if not _GATHERING.get():
        raise RuntimeError(
            "GiVA's vectors are sharded by FSDP2 (DTensor) here, and gathering them is a collective: merge_adapter / "
            "unmerge_adapter gather them on every rank; for an export or a delta weight take the adapter's state with "
            "giva.integrations.distributed.full_state_dict(model) on every rank, and save or load it into an unsharded "
            "model"
        )
    return tensor.full_tensor()


def _shaped_like(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``delta`` (whole, the same on every rank) laid out as ``weight``: this rank's shard where FSDP2 shards
    ``weight`` (a ``DTensor``; a collective, as every rank merges), ``delta`` itself otherwise."""
    if not isinstance(weight, DTensor):
        return delta
    return distribute_tensor(delta.detach(), weight.device_mesh, weight.placements)  # a leaf: merges need no gradient


def _tensor_state(tensor: torch.Tensor) -> Optional[tuple]:
    """What changes when a tensor's values are replaced or written in place (None: untracked, an inference tensor)."""
    try:
        return (tensor.data_ptr(), tensor._version)
    except RuntimeError:
        return None


def _as_float32(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` as float32 on ``device``: itself when it already is (no dispatch: this runs per layer per forward)."""
    if tensor.dtype == torch.float32 and tensor.device == device:
        return tensor
    return tensor.to(device=device, dtype=torch.float32)


class BasesNotInitializedError(RuntimeError):
    """Raised when a GiVA adapter with gradient bases is trained before `giva.initialize` filled them."""


@dataclass(frozen=True)
class Block:
    """One adapted output block of a (possibly fused) layer."""

    index: int  # position among the layer's blocks (0 for a plain layer)
    out_start: int  # first output row of the block in W
    out_size: int
    rank: int
    rank_offset: int  # first row of this block in the stacked A
    row_offset: int  # first row of this block in the stacked B / lambda_o


class GivaLayer(BaseTunerLayer):
    """State and maths shared by the GiVA layer types; every tensor of the method starts with ``giva_``."""

    adapter_layer_names: tuple[str, ...] = ("giva_lambda_s", "giva_lambda_o", "giva_core")
    # The bases are absent here on purpose: PEFT would cast them to a half-precision base
    # layer's dtype, and bases rounded through bf16 are no longer orthonormal.
    other_param_names: tuple[str, ...] = ("giva_out_index", "giva_dropout", "r", "blocks", "giva_compute_dtype")
    basis_names: tuple[str, ...] = ("giva_A", "giva_B")

    def __init__(self, base_layer: nn.Module, layer_name: str) -> None:
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.quantization_backend = None
        self.r: dict[str, int] = {}
        self.blocks: dict[str, list[Block]] = {}
        # Adapters whose bases are data-independent share one tensor per layer (giva.serving).
        self.giva_A = SharedBufferDict({}, persistent=True)
        self.giva_B = SharedBufferDict({}, persistent=True)
        self.giva_out_index = BufferDict({}, persistent=False)
        self.giva_lambda_s = nn.ParameterDict({})
        self.giva_lambda_o = nn.ParameterDict({})
        self.giva_core = nn.ParameterDict({})  # only adapters with GivaConfig.core: an R x R matrix
        self.giva_dropout = nn.ModuleDict({})
        # Per adapter: "input" (the adapter maths in the input's dtype) or "float32" (GivaConfig.compute_dtype).
        self.giva_compute_dtype: dict[str, str] = {}
        # PEFT's switch (peft.helpers.disable_input_dtype_casting): False leaves x in its dtype under "float32".
        self.cast_input_dtype_enabled = True
        # A cast to another dtype / device, per (adapter, dtype, device): (source, its state, cast copy). See _input_basis.
        self._giva_cast_bases: dict[tuple, tuple[torch.Tensor, Optional[tuple], _OnDevice]] = {}
        # (adapter, basis) -> (its tensor, seed, CRC32 of its bytes) when last found equal to its regeneration.
        self._giva_seeded_unmodified: dict[tuple[str, str], tuple[Any, int, int]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._bases_verified: set[str] = set()
        # `weight` adapters built for loading (inference_mode): their bases come from the checkpoint, so the
        # SVD of W is deferred to first use and skipped when the checkpoint filled them.
        self._deferred_weight_bases: set[str] = set()
        self.register_load_state_dict_post_hook(GivaLayer._verify_loaded_bases)
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"GiVA cannot adapt layer {layer_name!r} of type {type(self.get_base_layer()).__name__}")
        self.in_features: int = in_features
        self.out_features: int = out_features

    def _base_tensor(self) -> Optional[torch.Tensor]:
        """The base layer's first stored tensor (a quantised layer's packed weight as it is, never dequantised)."""
        base_layer = self.get_base_layer()
        return next(itertools.chain(base_layer.parameters(), base_layer.buffers()), None)

    def _base_device(self) -> torch.device:
        """The base layer's device, read off its first tensor: never dequantises a quantised weight."""
        tensor = self._base_tensor()
        return tensor.device if tensor is not None else torch.device("cpu")

    def base_weight_matrix(self) -> torch.Tensor:
        """``W`` as an ``out x in`` matrix, whatever the storage layout."""
        return transpose(self.get_base_weight(), self.fan_in_fan_out)

    def _full_weight_matrix(self) -> torch.Tensor:
        """``W`` (``out x in``) for the `weight` variant, refusing a DeepSpeed ZeRO-3 partitioned (empty) weight."""
        weight = self.get_base_weight()
        if weight.numel() != self.in_features * self.out_features:
            raise ValueError(
                f"GiVA variant 'weight' needs the full weight of layer {self.layer_name!r}, but it holds "
                f"{weight.numel()} of its {self.out_features} x {self.in_features} entries (partitioned, e.g. by DeepSpeed "
                "ZeRO-3). Wrap the model with get_peft_model before ZeRO-3 partitions it, or inside "
                "deepspeed.zero.GatheredParameters(model.parameters()), or use another variant."
            )
        return self.base_weight_matrix()

    def update_layer(
        self,
        adapter_name: str,
        block_sizes: list[int],
        adapt_blocks: list[int],
        config: GivaConfig,
        inference_mode: bool = False,
    ) -> None:
        """Create adapter ``adapter_name`` with one set of bases per adapted output block.

        ``inference_mode`` (or ``config.inference_mode``, as PEFT's ``from_pretrained`` sets it) freezes the vectors
        and, for the `weight` variant, defers the SVD of W: the checkpoint being loaded holds the bases.
        """
        inference_mode = inference_mode or config.inference_mode
        if config.variant == "weight" and not inference_mode and self.merged:
            raise RuntimeError(
                f"GiVA adapter {adapter_name!r} (variant 'weight') takes its bases from the SVD of W, but layer "
                f"{self.layer_name!r} has adapters {self.merged_adapters} merged into W: unmerge them first"
            )
        if sum(block_sizes) != self.out_features:
            raise ValueError(
                f"block sizes {block_sizes} of layer {self.layer_name!r} sum to {sum(block_sizes)}, but the layer has "
                f"{self.out_features} outputs"
            )
        if any(b >= len(block_sizes) for b in adapt_blocks):
            raise ValueError(
                f"adapt_blocks {adapt_blocks} of layer {self.layer_name!r} name a block >= {len(block_sizes)}"
            )
        starts = [sum(block_sizes[:i]) for i in range(len(block_sizes))]
        blocks, rank_offset, row_offset = [], 0, 0
        for index in sorted(set(adapt_blocks)):
            size = block_sizes[index]
            rank = min(config.r, max_rank(config.variant, size, self.in_features))
            if rank < 1:
                per_rank = 2 if config.variant == "VrU2r" else 1  # VrU2r takes 2 r singular vectors
                raise ValueError(
                    f"layer {self.layer_name!r} block {index} ({size} x {self.in_features}) is too small for variant "
                    f"{config.variant!r} at any rank: it needs min(out, in) >= {'2 r' if per_rank == 2 else 'r'}, so "
                    f">= {per_rank} for r=1, but min(out, in) = {min(size, self.in_features)}; use another variant "
                    "for it or leave it out of target_modules"
                )
            if rank < config.r:
                warnings.warn(
                    f"GiVA rank r={config.r} exceeds what layer {self.layer_name!r} (block {index}: {size} x "
                    f"{self.in_features}, variant {config.variant!r}) allows; clipped to {rank}."
                )
            blocks.append(Block(index, starts[index], size, rank, rank_offset, row_offset))
            rank_offset += rank
            row_offset += size
        self.blocks[adapter_name] = blocks
        self.r[adapter_name] = rank_offset

        device = self._base_device()
        a, b = self._initial_bases(blocks, config, from_checkpoint=inference_mode and config.variant == "weight")
        for name, basis in (("giva_A", a), ("giva_B", b)):
            storage = basis.to(device, basis_storage_dtype(config, name))
            getattr(self, name).add(adapter_name, storage, share=is_shareable(config, name))
        if row_offset != self.out_features:
            rows = torch.cat([torch.arange(blk.out_start, blk.out_start + blk.out_size) for blk in blocks])
            self.giva_out_index[adapter_name] = rows.to(device)
        self.giva_lambda_s[adapter_name] = nn.Parameter(torch.full((rank_offset,), float(config.lambda_s_init)))
        self.giva_lambda_o[adapter_name] = nn.Parameter(torch.full((row_offset,), float(config.lambda_o_init)))
        if config.core:
            self.giva_core[adapter_name] = nn.Parameter(torch.eye(rank_offset))
        elif adapter_name in self.giva_core:
            del self.giva_core[adapter_name]
        if not config.init_weights:
            # Test mode draws from the global RNG (as PEFT's other methods do), so two adapters of one config differ.
            with torch.no_grad():
                self.giva_lambda_s[adapter_name].uniform_(0.5, 1.5)
                self.giva_lambda_o[adapter_name].normal_(0.0, 0.1)
        self.giva_dropout[adapter_name] = nn.Dropout(config.giva_dropout) if config.giva_dropout > 0 else nn.Identity()
        self.giva_dropout[adapter_name].train(self.training)  # a new module is in train mode, an eval layer's must not be
        self.giva_compute_dtype[adapter_name] = config.compute_dtype
        self._bases_verified.discard(adapter_name)
        if bool(a.any()) and bool(b.any()):  # checked here on the CPU copies: no device sync in the forward
            self._bases_verified.add(adapter_name)
        self._forget_cast_bases(adapter_name)
        if inference_mode and config.variant == "weight":
            self._deferred_weight_bases.add(adapter_name)
        else:
            self._deferred_weight_bases.discard(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def copy_adapter(self, source: str, target: str) -> None:
        """Make adapter ``target`` (already built on this layer) an exact copy of ``source``: both bases, the vectors, the
        core, and the per-adapter state (blocks, rank, output rows, dropout, compute dtype). The bases are
        ``source``'s tensors, shared (no second copy in memory; a mixed batch of both keeps the shared-``B`` path):
        every write of a basis un-shares its entry first (:meth:`SharedBufferDict.write` under
        :meth:`set_block_bases`, and a state-dict load), so re-initialising or loading either leaves the other's
        values alone. The vectors and the core are copies of their own (``target`` trains without touching
        ``source``); every parameter keeps its ``requires_grad`` flag, so an inactive ``target`` stays frozen.
        (:meth:`GivaModel.inject_adapter` uses it for TRL's reference adapter.)"""
        self.ensure_bases(source)  # a `weight` adapter built for loading: its SVD now, so both hold the bases
        for name in self.basis_names:
            buffers = getattr(self, name)
            buffers._storage_dtypes[target] = buffers._storage_dtypes.get(source, buffers[source].dtype)
            buffers._buffers[target] = buffers._buffers[source]
        with torch.no_grad(), outside_inference_mode():
            for name in self.adapter_layer_names:
                params = getattr(self, name)
                if source not in params:
                    if target in params:
                        del params[target]
                    continue
                value = params[source].detach().clone()
                if target in params:
                    params[target].data = value  # the same Parameter (its requires_grad flag) with source's values
                else:
                    params[target] = nn.Parameter(value, requires_grad=False)
            if source in self.giva_out_index:
                self.giva_out_index[target] = self.giva_out_index[source].clone()
            elif target in self.giva_out_index:
                del self.giva_out_index[target]
        self.blocks[target] = list(self.blocks[source])
        self.r[target] = self.r[source]
        self.giva_dropout[target] = copy.deepcopy(self.giva_dropout[source])
        self.giva_compute_dtype[target] = self.giva_compute_dtype[source]
        self._deferred_weight_bases.discard(target)
        self._forget_cast_bases(target)
        if source in self._bases_verified:
            self._bases_verified.add(target)
        else:
            self._bases_verified.discard(target)

    def _initial_bases(
        self, blocks: list[Block], config: GivaConfig, from_checkpoint: bool = False, seeded_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked fp32 ``(A, B)`` as far as they are known before seeing data (zeros where data is needed).

        With ``from_checkpoint``, the `weight` variant's SVD is skipped: a checkpoint is about to fill them. With
        ``seeded_only``, only what (seed, layer name) gives: no SVD, no test-mode stand-in (nothing drawn from the
        global RNG).
        """
        total_rank = sum(blk.rank for blk in blocks)
        a = torch.zeros(total_rank, self.in_features)
        b = torch.zeros(sum(blk.out_size for blk in blocks), total_rank)
        wants_svd = config.variant == "weight" and not from_checkpoint and not seeded_only
        weight = self._full_weight_matrix() if wants_svd else None
        for blk in blocks:
            generator = layer_generator(config.seed, self.layer_name, blk.index)
            a_j: Optional[torch.Tensor] = None
            b_j: Optional[torch.Tensor] = None
            if config.variant in ("Vr", "VrUrand"):
                b_j = seeded_output_basis(config.variant, blk.out_size, blk.rank, generator)
            elif config.variant == "random":
                a_j, b_j = random_bases(blk.out_size, self.in_features, blk.rank, generator)
            elif weight is not None:
                a_j, b_j = bases_from_weight(weight[blk.out_start : blk.out_start + blk.out_size].float(), blk.rank)
            if not config.init_weights and a_j is None and not seeded_only:
                # Test mode: stand-in random bases so the adapter is not an identity, drawn from the global RNG
                # (they are saved with the adapter, unlike the seeded ones).
                stand_in = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
                a_j, b_rand = random_bases(blk.out_size, self.in_features, blk.rank, stand_in)
                b_j = b_rand if b_j is None else b_j
            rank_rows = slice(blk.rank_offset, blk.rank_offset + blk.rank)
            out_rows = slice(blk.row_offset, blk.row_offset + blk.out_size)
            if a_j is not None:
                a[rank_rows] = a_j
            if b_j is not None:
                b[out_rows, rank_rows] = b_j
        return a, b

    def regenerated_bases(self, adapter_name: str, config: GivaConfig, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The bases ``names`` of adapter ``adapter_name`` as a fresh build regenerates them from (seed, layer name)
        (what a load of a checkpoint omitting them gives): on the CPU, in their storage dtype. Only meaningful for the
        bases of ``config.variant`` that are seeded (``GivaModel._regenerable_bases``)."""
        a, b = self._initial_bases(self.blocks[adapter_name], config, seeded_only=True)
        fresh = {"giva_A": a, "giva_B": b}
        return {name: fresh[name].to(basis_storage_dtype(config, name)) for name in names}

    def unmodified_seeded_bases(
        self, adapter_name: str, config: GivaConfig, names: tuple[str, ...]
    ) -> tuple[tuple[str, ...], int]:
        """Those of the seeded bases ``names`` that still hold what (seed, layer name) regenerates, bit for bit (a
        checkpoint omits these; one written since, by ``set_block_bases``, a state-dict load or any in-place write,
        through ``.data`` included, is saved), and the CRC32 of their values chained in ``names`` order
        (:func:`values_crc32`: the checksum the checkpoint records). Each basis is copied to the CPU once.

        Compared with a regeneration; a basis found equal is remembered with its CRC (chained onto those of the
        unmodified bases before it), so a later save regenerates only when a basis's tensor or bytes changed since.
        """
        unmodified, fresh, crc = [], None, 0
        for name in names:
            stored = getattr(self, name)._buffers[adapter_name]
            host = stored.detach().cpu()
            chained = values_crc32(host, crc)
            known = self._giva_seeded_unmodified.get((adapter_name, name))
            if not (known is not None and known[0]() is stored and known[1:] == (config.seed, chained)):
                if fresh is None:
                    fresh = self.regenerated_bases(adapter_name, config, names)
                expected = fresh[name]
                if not (host.dtype == expected.dtype and host.shape == expected.shape and torch.equal(host, expected)):
                    continue
                self._giva_seeded_unmodified[(adapter_name, name)] = (weakref.ref(stored), config.seed, chained)
            unmodified.append(name)
            crc = chained
        return tuple(unmodified), crc

    def set_block_bases(self, adapter_name: str, block: Block, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write the bases of one block in place (fp32, kept out of autograd and of any optimizer)."""
        expected_a, expected_b = (block.rank, self.in_features), (block.out_size, block.rank)
        if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise ValueError(
                f"bases for layer {self.layer_name!r} block {block.index} must be A {expected_a} and B {expected_b}, "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        rank_rows = slice(block.rank_offset, block.rank_offset + block.rank)
        out_rows = slice(block.row_offset, block.row_offset + block.out_size)
        self.giva_A.write(adapter_name, (rank_rows,), a)
        self.giva_B.write(adapter_name, (out_rows, rank_rows), b)
        self._forget_cast_bases(adapter_name)
        # Checked here, once the last block is written, so a (compiled) forward needs no device sync for it.
        if self.bases_initialized(adapter_name):
            self._bases_verified.add(adapter_name)
        else:
            self._bases_verified.discard(adapter_name)

    def bases_initialized(self, adapter_name: str) -> bool:
        """True once A and B hold bases (never-initialised gradient adapters have A == 0, and B == 0 for VrUr/VrU2r)."""
        return bool(self.giva_A[adapter_name].any()) and bool(self.giva_B[adapter_name].any())

    def ensure_bases(self, adapter_name: str) -> None:
        """Compute the `weight` variant's bases at first use, unless a checkpoint already filled them.

        Only adapters built with ``inference_mode`` (for loading) defer them; anything that reads ``giva_A`` /
        ``giva_B`` directly (mixed batches, export) calls this first. A no-op otherwise.
        """
        if adapter_name not in self._deferred_weight_bases:
            return
        if not self.bases_initialized(adapter_name):
            if self.merged:
                raise RuntimeError(
                    f"GiVA adapter {adapter_name!r} on layer {self.layer_name!r} (variant 'weight', built for loading) "
                    "has no bases yet and W is merged with other adapters; load its checkpoint before merging"
                )
            weight = self._full_weight_matrix()
            for blk in self.blocks[adapter_name]:
                a, b = bases_from_weight(weight[blk.out_start : blk.out_start + blk.out_size].float(), blk.rank)
                self.set_block_bases(adapter_name, blk, a, b)
        self._deferred_weight_bases.discard(adapter_name)

    def _check_bases(self, adapter_name: str) -> None:
        """Refuse any forward that could train the vectors while the bases are still zero.

        That is a forward with gradients enabled and a trainable vector, in train or eval mode (eval-mode
        training would otherwise give exactly zero gradients, silently). Inference (``torch.no_grad()``,
        ``torch.inference_mode()``, frozen vectors) is allowed: the adapter is an identity until then. The
        check syncs with the device once per adapter, then is cached.
        """
        if adapter_name in self._bases_verified or not torch.is_grad_enabled():
            return
        if not (self.giva_lambda_s[adapter_name].requires_grad or self.giva_lambda_o[adapter_name].requires_grad):
            return
        if not self.bases_initialized(adapter_name):
            raise BasesNotInitializedError(
                f"GiVA adapter {adapter_name!r} on layer {self.layer_name!r} is being trained (a forward with gradients "
                "enabled and trainable vectors) before its bases were initialised. Call giva.initialize(peft_model, "
                "train_dataloader) once before training, or pass callbacks=[giva.GivaInitCallback()] to your "
                "transformers Trainer; for inference before that, run under torch.no_grad()."
            )
        self._bases_verified.add(adapter_name)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """``nn.Module._apply`` (``.to()``, ``.half()``, ``.cuda()``...) that moves the bases but keeps their dtype.

        Casting the model (``model.to(torch.bfloat16)``, DeepSpeed / accelerate half precision) must not round
        the bases: rows rounded through bf16 are no longer orthonormal (2e-3 instead of 5e-7). A basis whose
        dtype the cast changed is replaced by its original tensor moved to the new device; the forward casts
        the bases to the input's dtype at use. A widening cast (``model.to(torch.float64)``) leaves them too: their
        dtype is the config's ``bases_dtype``, which a checkpoint records and a load checks. Each distinct tensor is
        converted once, so shared bases stay shared.
        """
        before = {name: dict(getattr(self, name)._buffers) for name in self.basis_names}
        self._giva_cast_bases.clear()
        nn.Module._apply(self, fn, recurse)
        kept: dict[int, torch.Tensor] = {}
        for name, entries in before.items():
            buffers = getattr(self, name)
            for key, old in entries.items():
                new = buffers._buffers.get(key)
                if old is None or new is None or new.dtype == old.dtype:
                    continue
                if id(old) not in kept:
                    kept[id(old)] = old.to(device=new.device)
                buffers._buffers[key] = kept[id(old)]
        return self

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        target = device if device is not None else self._base_device()
        for name in self.basis_names:
            buffers = getattr(self, name)
            if adapter_name in buffers and buffers[adapter_name].device != torch.device("meta"):
                buffers[adapter_name] = buffers[adapter_name].to(target)

    def delete_adapter(self, adapter_name: str) -> None:
        for name in self.basis_names:
            if adapter_name in getattr(self, name):
                del getattr(self, name)[adapter_name]
        self._bases_verified.discard(adapter_name)
        self._deferred_weight_bases.discard(adapter_name)
        self._forget_cast_bases(adapter_name)
        for name in self.basis_names:
            self._giva_seeded_unmodified.pop((adapter_name, name), None)
        super().delete_adapter(adapter_name)

    def _output_basis(self, adapter_name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``B C`` (``O x R``, float32 or ``dtype``; ``C`` only with ``GivaConfig.core``) on ``device`` (the vectors')."""
        b = self.giva_B._buffers[adapter_name]
        b = _as_float32(b, device) if dtype == torch.float32 else b.to(device=device, dtype=dtype)
        core = self.giva_core._parameters.get(adapter_name)
        return b if core is None else b @ _whole(core).to(dtype)  # O x R

    def output_factor(self, adapter_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``B' = diag(lambda_o) B C`` (``O x R``, float32 or ``dtype``, under ``torch.autocast`` too): everything of
        delta_W after ``diag(lambda_s) A``, for merge, export and mixed batches (the forward folds ``lambda_s`` in too:
        :meth:`adapter_factor`)."""
        lambda_o = _whole(self.giva_lambda_o[adapter_name])
        with outside_autocast(lambda_o.device.type):  # B C is a matmul: autocast would run it in bf16
            return lambda_o.to(dtype).unsqueeze(1) * self._output_basis(adapter_name, lambda_o.device, dtype)

    def adapter_factor(self, adapter_name: str) -> torch.Tensor:
        """``F = diag(lambda_o) B C diag(lambda_s)`` (``O x R``, float32), so that ``delta_W = F A``.

        Formed as ``B C * (lambda_o lambda_s^T)``, the outer product as a (k=1) matmul: autograd then gives both
        vectors' gradients from ``F``'s with one elementwise op and two small matmuls, no reductions. Under
        ``torch.autocast`` too: its bf16 matmul would round ``lambda_s`` (and ``B C``) before the fold, so that a
        ``lambda_s`` step below bf16's spacing (2^-7 at 1) changed nothing; the forward rounds ``F`` once.
        """
        device_type = self.giva_lambda_o._parameters[adapter_name].device.type
        if autocast_enabled(device_type):  # no context entered on the common path
            with torch.autocast(device_type, enabled=False):
                return self._adapter_factor(adapter_name)
        return self._adapter_factor(adapter_name)

    def _adapter_factor(self, adapter_name: str) -> torch.Tensor:
        lambda_o = self.giva_lambda_o._parameters[adapter_name]
        lambda_o = _as_float32(lambda_o, lambda_o.device)
        lambda_s = _as_float32(self.giva_lambda_s._parameters[adapter_name], lambda_o.device)
        return self._output_basis(adapter_name, lambda_o.device) * (lambda_o.unsqueeze(1) @ lambda_s.unsqueeze(0))

    def _merge_dtype(self) -> torch.dtype:
        """The dtype merges and :meth:`delta_weight` compute in: float64 for a float64 base weight (rounding W through
        fp32 would lose its bits), float32 otherwise (half precision and quantised weights included)."""
        tensor = self._base_tensor()
        return torch.float64 if tensor is not None and tensor.dtype == torch.float64 else torch.float32

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``delta_W`` of one adapter in fp32 (fp64 for a float64 base weight; under ``torch.autocast`` too, so that a
        merge outside it and an unmerge inside it, or the other way round, give W back), in the base weight's layout
        (``in x out`` for Conv1D)."""
        self.ensure_bases(adapter_name)
        dtype = self._merge_dtype()
        a = self.giva_A[adapter_name].to(dtype)  # R x in
        lambda_s = _whole(self.giva_lambda_s[adapter_name]).to(device=a.device, dtype=dtype)
        with outside_autocast(a.device.type):
            delta = self.output_factor(adapter_name, dtype).to(a.device) @ (lambda_s[:, None] * a)  # O x in
        if adapter_name in self.giva_out_index:
            full = delta.new_zeros(self.out_features, self.in_features)
            delta = full.index_copy_(0, self.giva_out_index[adapter_name], delta)
        return transpose(delta, self.fan_in_fan_out)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """GiVA is additive and already low-rank: ``giva.export`` gives PEFT the exact LoRA factors."""
        return True

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """PEFT's name for :meth:`delta_weight`, in the base weight's dtype; on a quantised base layer in the dtype
        merges compute in (fp32), as PEFT LoRA's quantised layers give theirs in the adapter's: its stored weight is
        packed (a GPTQ layer's int32 ``qweight`` made every delta 0), and dequantising W only to read a dtype costs a
        copy of W."""
        tensor = self._base_tensor()
        if self.quantization_backend is not None or tensor is None or not tensor.is_floating_point():
            return self.delta_weight(adapter_name)
        return self.delta_weight(adapter_name).to(tensor.dtype)

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        """``W' - W`` for PEFT >= 0.22's ``get_additive_delta`` (which refuses while adapters are merged): GiVA is
        additive, so :meth:`delta_weight`, in the adapter's dtype (its vectors', fp32 by default) as PEFT asks, not
        the base weight's (a quantised weight's is no float type)."""
        return self.delta_weight(adapter_name).to(self.giva_lambda_s[adapter_name].dtype)

    def _check_mergeable(self, action: str) -> None:
        """Refuse a merge PEFT's quantisation backend cannot do; warn, as PEFT's LoRA does, that it rounds."""
        backend = self.quantization_backend
        if backend is None:
            return
        if not backend.supports_merge:
            raise TypeError(
                f"cannot {action} GiVA on layer {self.layer_name!r}: its base layer is quantised with "
                f"{backend.backend_name!r}, whose PEFT backend cannot dequantise and re-quantise the weight"
            )
        warnings.warn(
            f"{action.capitalize()} giva module to {backend.backend_name} linear may get different generations due to "
            "rounding errors."
        )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add delta_W of the given (default: active) adapters to W, in fp32 (fp64 for a float64 W) then cast back.

        With ``safe_merge`` the merged weight is checked for NaN/inf before it replaces W, so a broken
        adapter leaves the base weight untouched. A quantised W is dequantised, changed and re-quantised by
        the layer's ``quantization_backend`` (so unmerge restores it only up to the quantisation error).
        """
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.giva_lambda_o]
        if names:
            self._check_mergeable("merge")
        with _gathering_sharded_vectors():
            for name in names:
                weight, delta = self._weight_and_delta(name)
                merged = (weight.to(delta.dtype) + delta).to(weight.dtype)
                # after the cast: an fp16 weight can overflow in it
                if safe_merge and not _whole(torch.isfinite(merged).all()):
                    raise ValueError(f"NaNs detected in the merged weights of layer {self.layer_name!r}: adapter {name!r} seems broken")
                self.set_base_weight(merged)
                self.merged_adapters.append(name)

    def _weight_and_delta(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``W`` as :meth:`get_base_weight` reads it, and ``delta_W`` of adapter ``name`` in the merge dtype
        (:meth:`delta_weight`'s) on W's device, laid out like W (this rank's shard of it for an FSDP2-sharded W)."""
        weight = self.get_base_weight()
        return weight, _shaped_like(self.delta_weight(name).to(weight.device), weight)

    def set_base_weight(self, weight_data: torch.Tensor) -> None:
        """PEFT's ``set_base_weight``; an FSDP2-sharded weight is written in place, into the shard FSDP2 gathers
        from (replacing ``.data`` would leave FSDP2 gathering the old values). A weight that FSDP2 left unsharded
        after a forward is its temporary copy, which the next reshard drops with what was written into it: a merge
        must come after a reshard (``PeftModel.merge_adapter`` reshards first from PEFT 0.22 on; before
        ``merge_and_unload``, call the FSDP2 root's ``reshard()`` on every rank). Quantised layers override this."""
        current = self.get_base_weight()
        if isinstance(current, DTensor):
            current.data.copy_(weight_data)
        else:
            super().set_base_weight(weight_data)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._check_mergeable("unmerge")
        with _gathering_sharded_vectors():
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                if name in self.giva_lambda_o:
                    weight, delta = self._weight_and_delta(name)
                    self.set_base_weight((weight.to(delta.dtype) - delta).to(weight.dtype))
                self.merged_adapters.pop()  # only once W no longer holds it: a failure above leaves the record true

    def _forget_cast_bases(self, adapter_name: Optional[str] = None) -> None:
        """Drop the cast copies of ``A`` (of one adapter, or all): its values, dtype or device changed."""
        for key in [k for k in self._giva_cast_bases if adapter_name is None or k[0] == adapter_name]:
            del self._giva_cast_bases[key]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self._forget_cast_bases()  # the bases below this layer are about to be overwritten in place
        self._bases_verified.clear()  # checked again once loaded (_verify_loaded_bases)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _verify_loaded_bases(layer: nn.Module, incompatible_keys: Any) -> None:
        """After a load, mark the adapters whose bases are filled, so the forward needs no device sync for it."""
        for name, a in layer.giva_A._buffers.items():
            b = layer.giva_B._buffers.get(name)
            if a is not None and b is not None and a.device.type != "meta" and b.device.type != "meta":
                if layer.bases_initialized(name):
                    layer._bases_verified.add(name)

    def _input_basis(self, adapter_name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``A`` in the compute dtype and device, outside autograd: the stored tensor when it already is, else a
        copy cast once and reused until ``A`` changes (``set_block_bases``, a load, ``.to()``, or any in-place
        write PyTorch counts), so no eager forward casts a basis (a compiled graph casts it in the graph)."""
        a = self.giva_A._buffers[adapter_name]
        if a.dtype == dtype and a.device == device:
            return a
        if torch.compiler.is_compiling():
            # The cast inside the graph, the cache left alone: reading it guards the graph on the dict's keys and
            # writing it breaks that guard, so every compiled region would compile again on its second call.
            return a.to(device=device, dtype=dtype)
        key = (adapter_name, dtype, device)
        entry = self._giva_cast_bases.get(key)
        state = _tensor_state(a)
        if entry is not None and entry[0] is a and state is not None and entry[1] == state:
            cast = entry[2]
        else:
            # Cached, so never an inference tensor, which no later forward with autograd could use.
            with torch.no_grad(), outside_inference_mode():
                cast = _OnDevice(a.to(device=device, dtype=dtype))
            self._giva_cast_bases[key] = (a, state, cast)
        cast.used_here()  # another CUDA stream waits for the cast and is recorded on it (its memory outlives its reads)
        return cast.tensors[0]

    def _compute_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``x`` in the dtype the adapter maths run in: its own, or float32 for ``compute_dtype="float32"`` (unless
        ``cast_input_dtype_enabled`` is off, as under ``peft.helpers.disable_input_dtype_casting``)."""
        if self.giva_compute_dtype.get(adapter_name, "input") == "float32":
            return self._cast_input_dtype(x, torch.float32)
        return x

    def _prepare_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """Check the bases (computing deferred `weight` ones), then ``x`` in the compute dtype, dropout applied."""
        self.ensure_bases(adapter_name)
        self._check_bases(adapter_name)
        x = self._compute_input(x, adapter_name)
        dropout = self.giva_dropout._modules[adapter_name]
        return x if type(dropout) is nn.Identity else dropout(x)  # no module call for the no-op

    def _thin_activation_and_factor(self, x: torch.Tensor, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, F)`` with ``lambda_o * B (lambda_s * A x) = F.linear(h, F)``, for ``x`` from :meth:`_prepare_input`:
        ``h = A x`` (tokens x R) in ``x``'s dtype, and both vectors (and the core ``C``, if any) folded into
        ``F = diag(lambda_o) B C diag(lambda_s)`` (O x R, :meth:`adapter_factor`): formed in float32, rounded once to
        that dtype.

        ``A`` is a frozen buffer, so autograd forms no ``R x in`` gradient; the vectors' gradients come from
        ``F``'s (an ``O x R`` product over the tokens, the one ``lambda_o`` needs anyway) through small ``O x R``
        ops, so nothing of size tokens x R or tokens x O is scaled, cast or copied.
        """
        h = F.linear(x, self._input_basis(adapter_name, x.dtype, x.device))  # tokens x R
        return h, self.adapter_factor(adapter_name).to(device=h.device, dtype=x.dtype)

    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``lambda_o * B (lambda_s * A dropout(x))``, shape ``(..., O)``: one ``F.linear(h, F)`` over the thin ``h``
        (see :meth:`_thin_activation_and_factor`)."""
        if self._outside_autocast(x, adapter_name):
            with torch.autocast(x.device.type, enabled=False):
                return self._adapter_output(x, adapter_name)
        h, factor = self._thin_activation_and_factor(self._prepare_input(x, adapter_name), adapter_name)
        return F.linear(h, factor)  # tokens x O

    def _outside_autocast(self, x: torch.Tensor, adapter_name: str) -> bool:
        """Whether the adapter maths must leave ``torch.autocast``: ``compute_dtype="float32"`` keeps them in fp32 under
        it (their result cast to the base output's dtype, as without autocast). With ``"input"`` they follow autocast,
        as PEFT LoRA's do; only the factor is formed in fp32 (:meth:`adapter_factor`)."""
        return self.giva_compute_dtype.get(adapter_name, "input") == "float32" and autocast_enabled(x.device.type)

    def _add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``result`` (the base output) plus the adapter's output (see :meth:`_outside_autocast` for autocast).

        When the adapter maths run in ``result``'s dtype, one ``addmm`` on the 2-D views of the tokens (the add
        fused into the product: no tokens x O temporary, no elementwise pass over the output); ``index_add`` for
        partial fused blocks; else a product, its cast to ``result``'s dtype and an add (``compute_dtype="float32"``
        on a half-precision base or under autocast).
        """
        if self._outside_autocast(x, adapter_name):
            with torch.autocast(x.device.type, enabled=False):
                return self._add_adapter_output(result, x, adapter_name)  # once: autocast is off in there
        x = self._prepare_input(x, adapter_name)
        if adapter_name in self.giva_out_index._buffers:
            h, factor = self._thin_activation_and_factor(x, adapter_name)
            return result.index_add(-1, self.giva_out_index[adapter_name], F.linear(h, factor).to(result.dtype))
        h, factor = self._thin_activation_and_factor(x.reshape(-1, x.shape[-1]), adapter_name)  # tokens x R
        if h.dtype == result.dtype and result.is_contiguous():  # (under autocast h has its dtype already)
            return torch.addmm(result.view(-1, self.out_features), h, factor.t()).view(result.shape)
        return result + F.linear(h, factor).to(result.dtype).view(result.shape)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            check_mixed_batch_args(self, x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return mixed_batch_forward(self, self.base_layer(x, *args, **kwargs), x, adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.giva_lambda_o:
                result = self._add_adapter_output(result, x, adapter)
        return result

    def __repr__(self) -> str:
        return "giva." + nn.Module.__repr__(self)  # the module tree, as PEFT's "lora." layers print it


class Linear(nn.Module, GivaLayer):
    """GiVA on an ``nn.Linear`` or a transformers ``Conv1D`` (``fan_in_fan_out``)."""

    # nn.Module comes first in the MRO (as in PEFT's layers), so point it at GivaLayer's versions.
    forward = GivaLayer.forward
    _apply = GivaLayer._apply
    _load_from_state_dict = GivaLayer._load_from_state_dict
    __repr__ = GivaLayer.__repr__

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        layer_name: str,
        block_sizes: list[int],
        adapt_blocks: list[int],
        config: GivaConfig,
        fan_in_fan_out: bool,
    ) -> None:
        super().__init__()
        GivaLayer.__init__(self, base_layer, layer_name)
        self.fan_in_fan_out = fan_in_fan_out
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, block_sizes, adapt_blocks, config)
