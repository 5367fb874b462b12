"""Serving many GiVA adapters from one model: shared bases and the batched mixed-adapter forward.

Two things make an extra GiVA adapter cheap to hold and to serve:

* **Shared bases.** A basis that is a function of (seed, layer, block) and the variant only (the
  seeded ``B`` of `Vr` / `VrUrand` / `random`, and ``A`` of `random`) or of the frozen weight
  (`weight`) is bit-identical across the adapters of a layer, so they hold ONE tensor, as VeRA's
  shared buffers: an extra `Vr` adapter costs its ``A`` and the two vectors.
* **Mixed batches.** A batch whose rows use different adapters (``adapter_names=[...]``, one name
  per row, as in PEFT's LoRA) runs as one gather of the per-row ``A`` and vectors and two batched
  matmuls per layer; with a shared ``B`` the second is a single matmul for the whole batch.

Nothing here imports the layer module (the layer imports this one).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from .precision import autocast_enabled

BASE_ADAPTER_NAME = "__base__"  # PEFT's row name for "no adapter"
BASES_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Bases that are data-independent for each variant, hence identical across the adapters of a layer.
SHAREABLE_BASES: dict[str, tuple[str, ...]] = {
    "Vr": ("giva_B",),
    "VrUrand": ("giva_B",),
    "random": ("giva_A", "giva_B"),
    "weight": ("giva_A", "giva_B"),
}


def basis_storage_dtype(config: Any, basis_name: str) -> torch.dtype:
    """The dtype a basis is stored (and trained, saved, reloaded) in: ``A`` as ``config.bases_dtype``, ``B`` in fp32.

    Storing ``A`` in bf16 halves what an extra adapter costs; its rows are then orthonormal to ~1e-3 only
    (bf16 has 8 significant bits), and because training reads exactly the stored values, reload stays bit-exact.
    """
    if basis_name == "giva_A":
        return BASES_DTYPES[getattr(config, "bases_dtype", "float32")]
    return torch.float32


def is_shareable(config: Any, basis_name: str) -> bool:
    """True if this basis of this config's variant is the same for every adapter of a layer."""
    return basis_name in SHAREABLE_BASES.get(config.variant, ())


class SharedBufferDict(BufferDict):
    """A ``BufferDict`` in which several keys may hold one tensor (shared bases of several adapters).

    Sharing survives ``model.to(...)``/``.half()`` (each distinct tensor is converted once) and is undone
    for an entry before different values are loaded or written into it, so sharing never changes values.
    Each entry keeps the dtype it was added with (``bases_dtype``): a later assignment is cast to it, so PEFT's
    upcast of half-precision adapter tensors does not turn a bf16 basis into another set of values.
    """

    def __init__(self, buffers: Optional[dict[str, torch.Tensor]] = None, persistent: bool = False) -> None:
        self._storage_dtypes: dict[str, torch.dtype] = {}
        super().__init__(buffers, persistent=persistent)

    def __setitem__(self, key: str, buffer: torch.Tensor) -> None:
        dtype = self._storage_dtypes.get(key)
        if dtype is not None and buffer is not None and buffer.dtype != dtype:
            buffer = buffer.to(dtype)
        super().__setitem__(key, buffer)

    def __delitem__(self, key: str) -> None:
        self._storage_dtypes.pop(key, None)
        super().__delitem__(key)

    def add(self, key: str, value: torch.Tensor, share: bool) -> None:
        """Store ``value`` under ``key`` in its dtype; with ``share``, reuse a bit-identical tensor another key holds."""
        self._storage_dtypes[key] = value.dtype
        if share:
            for other in self._buffers.values():
                if (
                    other is not None
                    and other.shape == value.shape
                    and other.dtype == value.dtype
                    and other.device == value.device
                    and torch.equal(other, value)
                ):
                    value = other
                    break
        self[key] = value

    def is_shared(self, key: str) -> bool:
        tensor = self._buffers[key]
        return any(other is tensor for name, other in self._buffers.items() if name != key)

    def unshare(self, key: str) -> None:
        """Give ``key`` its own copy (before an in-place write that must not reach the other adapters)."""
        if key in self._buffers and self.is_shared(key):
            with outside_inference_mode():  # the adapter's own buffer from now on
                self._buffers[key] = self._buffers[key].clone()

    def write(self, key: str, index: tuple, value: torch.Tensor) -> None:
        """``self[key][index] = value`` in place, outside autograd; a shared entry is un-shared first unless the
        values are already there (re-initialising a seeded ``B`` keeps it shared)."""
        target = self._buffers[key]
        if self.is_shared(key) and not torch.equal(target[index], value.to(target)):
            self.unshare(key)
        with torch.no_grad():
            self._buffers[key][index].copy_(value)

    def distinct_tensors(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for tensor in self._buffers.values():
            if tensor is not None:
                seen.setdefault(id(tensor), tensor)
        return list(seen.values())

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> SharedBufferDict:
        converted: dict[int, torch.Tensor] = {}
        for key, tensor in self._buffers.items():
            if tensor is not None:
                if id(tensor) not in converted:
                    converted[id(tensor)] = fn(tensor)
                self._buffers[key] = converted[id(tensor)]
        return self

    def _load_from_state_dict(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        for key, tensor in list(self._buffers.items()):
            incoming = state_dict.get(prefix + key)
            if (
                tensor is not None
                and incoming is not None
                and self.is_shared(key)
                and not (incoming.shape == tensor.shape and torch.equal(incoming.to(tensor), tensor))
            ):
                self.unshare(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Mixed-adapter batches
#
# For the P distinct adapters of a batch that a layer holds, the stack concatenates their A (``sumR x in``, every
# rank and block layout alike) and, per row, a "selector" S (``batch x sumR``) holds lambda_s on the columns of the
# row's adapter and zeros elsewhere. Then, with ``tokens = batch x seq``:
#
#     H = (x A_cat^T) * S                      tokens x sumR     (one GEMM for every adapter, one multiply)
#     shared B:   out += lambda_o[row] * ((H summed over the P slots) B^T)      tokens x R, then tokens x O
#     otherwise:  out += H B'_cat^T,  B'_cat = [lambda_o_p * B_p] (O x sumR, zero rows off an adapter's blocks)
#
# The kernels per layer do not depend on P, nothing is gathered per row but the small S and lambda_o rows, and the
# largest per-call temporary is ``tokens x O`` (what LoRA's mixed batch also forms). Index tensors live on the
# device, built once per (adapter names, device): no host-device copy or synchronisation in a forward.


def check_mixed_batch_args(layer: Any, x: torch.Tensor, adapter_names: Sequence[str]) -> None:
    """The checks PEFT's LoRA makes on ``adapter_names`` at each layer (``LoraLayer._check_forward_args``)."""
    if len(x) != len(adapter_names):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(adapter_names)} and {len(x)} respectively."
        )
    if layer.merged:
        raise ValueError(
            "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )


@functools.lru_cache(maxsize=1024)
def _unique(names: tuple[str, ...]) -> tuple[str, ...]:
    """The distinct names of a batch, in first-seen order."""
    return tuple(dict.fromkeys(names))


class _OnDevice:
    """Tensors built once and reused by forwards on any CUDA stream of their device.

    Built by kernels queued on one stream, they are not ready for another stream until that work has run: a stream
    that uses them for the first time waits (on the device, not the host) for an event recorded where they were
    built. And a tensor freed while a kernel queued on another stream still reads it could be handed to a new
    allocation of the stream it was allocated on; ``record_stream`` on each stream that uses it (once per stream;
    on its own stream it is a no-op) makes the allocator wait for that stream's work first.
    """

    def __init__(self, *tensors: Optional[torch.Tensor]) -> None:
        self.tensors = tuple(t for t in tensors if t is not None)
        self._cuda = len(self.tensors) > 0 and self.tensors[0].device.type == "cuda"
        self._streams: set[tuple[int, int]] = set()
        self._ready: Optional[torch.cuda.Event] = None
        self._last_raw: Optional[int] = None  # the raw handle of the stream that used them last (a cheap test)
        if self._cuda and not torch.compiler.is_compiling():  # a compiled graph's tensors are its own
            stream = torch.cuda.current_stream(self.tensors[0].device)
            self._ready = torch.cuda.Event()
            self._ready.record(stream)  # after the kernels that filled the tensors, on the stream that queued them
            self._streams.add((stream.device_index, stream.stream_id))

    def used_here(self) -> None:
        """Call before each use: the first time the current CUDA stream uses the tensors, it waits for them to be
        built and is recorded on them. Per call, on the stream that used them last: one integer read (no Stream
        object is built), as every layer's forward calls it."""
        if not self._cuda or torch.compiler.is_compiling():  # under dynamo: the compiled graph orders its own reads
            return
        device = self.tensors[0].device
        raw = torch._C._cuda_getCurrentRawStream(device.index)
        if raw == self._last_raw:
            return
        stream = torch.cuda.current_stream(device)
        key = (stream.device_index, stream.stream_id)
        if key not in self._streams:
            if self._ready is not None:
                stream.wait_event(self._ready)
            for tensor in self.tensors:
                tensor.record_stream(stream)
            self._streams.add(key)
        self._last_raw = raw


# The guard of tensors built for one forward and freed after it (a forward with autograd on, inference tensors): they
# are made and read on the same stream, so there is nothing to wait for and no CUDA event to record per layer.
_UNGUARDED = _OnDevice()


def _guard(cached: bool, *tensors: Optional[torch.Tensor]) -> _OnDevice:
    return _OnDevice(*tensors) if cached else _UNGUARDED


def outside_inference_mode() -> AbstractContextManager:
    """Around a tensor that is cached for later forwards: made under ``torch.inference_mode()`` it would be an
    inference tensor, which no later forward with autograd on may use (it could never train again). Nothing while
    dynamo traces: it cannot trace the mode test (a graph break), and a compiled graph's tensors are its own."""
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
        return nullcontext()
    return torch.inference_mode(False)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor; to CUDA through pinned memory, asynchronously (the host does not wait)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True)
class _Rows:
    """Per-row index tensors of one batch (adapter names) for one stack layout, on the stack's device."""

    slots: torch.Tensor  # batch: the row's adapter among the present ones, 1..P, or 0 (no adapter in this layer)
    gather: torch.Tensor  # batch: slots - 1, 0 for rows without an adapter (their lambda_s rows are zero)
    columns: torch.Tensor  # batch x sumR: 1 + the stacked column, on the row's adapter's columns; 0 elsewhere
    keep: Optional[torch.Tensor]  # batch x 2: 1 - dropout p of the row's adapter, 1 / (1 - p) (0 for p = 1); None: no dropout
    guard: _OnDevice


@functools.lru_cache(maxsize=1024)
def _rows(
    names: tuple[str, ...], present: tuple[str, ...], ranks: tuple[int, ...], dropout: tuple[float, ...], device: torch.device
) -> _Rows:
    """Built once per (names, present adapters and their ranks and dropout, device), then reused by every layer alike
    (with autograd on or off)."""
    with outside_inference_mode():
        return _build_rows(names, present, ranks, dropout, device)


def _build_rows(
    names: tuple[str, ...], present: tuple[str, ...], ranks: tuple[int, ...], dropout: tuple[float, ...], device: torch.device
) -> _Rows:
    slot_of = {name: slot for slot, name in enumerate(present, start=1)}
    offsets = [sum(ranks[:i]) for i in range(len(ranks))]
    slots, columns = [], []
    for name in names:
        slot = slot_of.get(name, 0)
        slots.append(slot)
        row = [0] * sum(ranks)
        if slot:
            start = offsets[slot - 1]
            row[start : start + ranks[slot - 1]] = range(start + 1, start + ranks[slot - 1] + 1)
        columns.append(row)
    keep = None
    if any(dropout):
        p = [dropout[s - 1] if s else 0.0 for s in slots]
        keep = _to_device([[1.0 - q, 1.0 / (1.0 - q) if q < 1 else 0.0] for q in p], torch.float32, device)
    slot_tensor = _to_device(slots, torch.long, device)
    gather_tensor = _to_device([max(slot - 1, 0) for slot in slots], torch.long, device)
    column_tensor = _to_device(columns, torch.long, device)
    return _Rows(slot_tensor, gather_tensor, column_tensor, keep, _OnDevice(slot_tensor, gather_tensor, column_tensor, keep))


@functools.lru_cache(maxsize=1024)
def _guarded_index(values: tuple[int, ...], device: torch.device) -> _OnDevice:
    with outside_inference_mode():
        return _OnDevice(_to_device(list(values), torch.long, device))


def _index(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A constant index tensor on ``device``, built once and ready on the current stream (the stacks that use it
    record their streams on it)."""
    guarded = _guarded_index(values, device)
    guarded.used_here()
    return guarded.tensors[0]


@dataclass(frozen=True)
class _Batch:
    """What one batch (adapter names) reads from a stack, per row."""

    selector: torch.Tensor  # batch x sumR: lambda_s on the columns of the row's adapter, zeros elsewhere
    lambda_s: Optional[torch.Tensor]  # batch x R with a shared B: the row's lambda_s (zeros: no adapter)
    lambda_o: Optional[torch.Tensor]  # batch x O with a shared B: the row's lambda_o (zeros: no adapter)
    guard: _OnDevice


@dataclass
class _Stacked:
    """The present adapters of one layer in compute dtype and device (see the section comment for the maths)."""

    a: torch.Tensor  # sumR x in: the adapters' A one under another (each its own rank and blocks)
    lambda_s: torch.Tensor  # 1 + sumR: a zero, then the adapters' lambda_s (indexed by _Rows.columns)
    ranks: tuple[int, ...]
    shared_b: Optional[torch.Tensor]  # O x R when every adapter holds the same B on the same rows, else None
    lambda_o: Optional[torch.Tensor]  # (1 + P) x O with shared_b: a zero row, then each adapter's lambda_o
    b: Optional[torch.Tensor]  # O x sumR without shared_b: lambda_o_p * B_p on each adapter's columns and rows
    out_index: Optional[torch.Tensor]  # the O output rows of W the adapters write, None for all of them
    guard: _OnDevice
    per_batch: dict = field(default_factory=dict)  # names -> _Batch: cached with the stack (no autograd)

    def for_batch(self, rows: _Rows, names: tuple[str, ...], cache: bool) -> _Batch:
        cache = cache and self.guard is not _UNGUARDED  # a stack built for one forward (inference tensors) keeps nothing
        found = self.per_batch.get(names) if cache else None
        if found is not None:
            return found
        selector = self.lambda_s[rows.columns]
        lambda_s = lambda_o = None
        if self.shared_b is not None:  # one rank R: each row's lambda_s is its only non-zero slot of S
            lambda_s = selector.view(len(selector), len(self.ranks), -1).sum(1)
            lambda_o = self.lambda_o.index_select(0, rows.slots)
        made = _Batch(selector, lambda_s, lambda_o, _guard(cache, selector, lambda_s, lambda_o))
        if cache:
            if len(self.per_batch) >= 64:  # a server cycling through many batches: keep the newest
                self.per_batch.pop(next(iter(self.per_batch)))
            self.per_batch[names] = made
        return made


def mixed_batch_forward(layer: Any, result: torch.Tensor, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
    """Add each row's adapter output to the base output ``result`` (``(batch, ..., out)``); ``x`` is ``(batch, ..., in)``.

    Rows whose name is ``"__base__"`` or an adapter this layer does not hold get nothing. All adapters of a batch,
    whatever their rank or block layout, go through the same few kernels (see the section comment), in ``x``'s
    dtype; nothing waits on the device. The stacked adapter tensors are reused across forwards without autograd
    (see :func:`clear_mixed_batch_cache`); with autograd on they are built from the live vectors, which get gradients.
    """
    names = tuple(adapter_names)
    unique = _unique(names)
    held = layer.giva_lambda_o._parameters  # the dict itself: this runs for every layer of every forward
    present = tuple(name for name in unique if name in held)
    if not present:
        return result
    if layer._deferred_weight_bases:
        for name in present:
            layer.ensure_bases(name)  # `weight` adapters built for loading compute their bases at first use
    if len(unique) == 1:  # every row uses one adapter: the plain single-adapter forward
        return layer._add_adapter_output(result, x, present[0])
    fp32 = None  # a loop, not next(generator, None), which dynamo before torch 2.9 does not trace (a graph break)
    for name in present:
        if layer.giva_compute_dtype.get(name, "input") == "float32":
            fp32 = name
            break
    if fp32 is not None:  # an adapter asks for fp32 adapter maths: the whole batch's run in it, under autocast too
        x = layer._compute_input(x, fp32)
        if autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return _mixed_adapter_outputs(layer, result, x, names, present)
    return _mixed_adapter_outputs(layer, result, x, names, present)


def _mixed_adapter_outputs(
    layer: Any, result: torch.Tensor, x: torch.Tensor, names: tuple[str, ...], present: tuple[str, ...]
) -> torch.Tensor:
    """:func:`mixed_batch_forward` from the stacks on: ``x`` in the compute dtype, ``present`` the adapters held."""
    # The stacks are reused across forwards without autograd; under torch.compile they are built inside the graph
    # instead (the cache's data-pointer test breaks a graph, and the compiled graph is what is reused there).
    cache = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if torch.is_grad_enabled():  # a forward that could train: refuse zero gradient bases, as the one-adapter forward does
        for name in present:
            layer._check_bases(name)
    # The compute dtype: autocast's where it is on (its matmuls run in it, and so does the base layer's output), so the
    # stacks are in it and the add below stays one in-place op; else x's.
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if autocast_enabled(device_type) else x.dtype
    stacked = _stacked(layer, present, x.device, dtype) if cache else _build_stacked(layer, present, x.device, dtype, cached=False)
    dropout = tuple(float(getattr(layer.giva_dropout[n], "p", 0.0)) for n in present) if layer.training else ()
    rows = _rows(names, present, stacked.ranks, dropout, x.device)
    per_row = stacked.for_batch(rows, names, cache)
    for guard in (stacked.guard, rows.guard, per_row.guard):
        guard.used_here()

    batch, out = x.shape[0], result.shape[-1]
    x3 = x.reshape(batch, -1, x.shape[-1])  # batch x seq x in
    if rows.keep is not None:  # each row with its adapter's dropout
        keep = rows.keep.to(x.dtype)[:, None, :]
        x3 = x3 * torch.bernoulli(keep[..., :1].expand_as(x3)) * keep[..., 1:]
    shared = stacked.shared_b is not None
    if shared and x3.shape[1] >= stacked.ranks[0]:
        # Rows of at least R tokens (a prefill): gather each row's A, batch x R x in (no larger than x itself), and
        # skip the other adapters' columns: tokens x in x R instead of tokens x in x sumR.
        a_rows = stacked.a.view(len(stacked.ranks), -1, stacked.a.shape[-1]).index_select(0, rows.gather)
        h = torch.bmm(x3, a_rows.transpose(1, 2)) * per_row.lambda_s[:, None, :]  # batch x seq x R
    else:
        h = torch.matmul(x3, stacked.a.T) * per_row.selector[:, None, :]  # batch x seq x sumR, zero off each row's adapter
        if shared:
            h = h.reshape(*h.shape[:2], len(stacked.ranks), -1).sum(2)  # batch x seq x R: each row's one non-zero slot
    # In place into `result` (the base layer's fresh output) when autograd does not need it.
    in_place = (
        result.dtype == dtype
        and result.is_contiguous()
        and not (torch.is_grad_enabled() and (result.requires_grad or h.requires_grad))
    )
    result3 = result.view(batch, -1, out) if result.is_contiguous() else result.reshape(batch, -1, out)
    if shared:
        z = torch.matmul(h, stacked.shared_b.T)  # batch x seq x O
        if stacked.out_index is None and in_place:
            result3.addcmul_(z, per_row.lambda_o[:, None, :])
            return result
        delta = z * per_row.lambda_o[:, None, :]
    else:
        if stacked.out_index is None and in_place:
            result.view(-1, out).addmm_(h.reshape(-1, h.shape[-1]), stacked.b.T)
            return result
        delta = torch.matmul(h, stacked.b.T)  # batch x seq x O
    delta = delta.to(result.dtype)
    if stacked.out_index is None:
        return (result3 + delta).reshape(result.shape)
    if in_place:
        return result3.index_add_(-1, stacked.out_index, delta).reshape(result.shape)
    return result3.index_add(-1, stacked.out_index, delta).reshape(result.shape)


@dataclass(frozen=True)
class _CacheEntry:
    key: tuple  # (present adapters, device, dtype)
    sources: tuple[weakref.ref, ...]  # the tensors the stack was built from
    states: list[tuple[int, int]]  # their (data_ptr, version) at build time
    stacked: _Stacked


# One entry per layer: the stack of the last batch's adapters (autoregressive decoding repeats it every step).
_STACK_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_mixed_batch_cache(model: Optional[nn.Module] = None) -> None:
    """Drop the stacked adapter tensors kept between mixed-batch forwards (of ``model``'s layers, or of all).

    The cache notices adapters added, deleted or replaced, moved or cast, and every in-place write that
    PyTorch counts (optimizer steps, ``load_state_dict``, writes under ``torch.no_grad()``); a write through
    ``param.data`` bypasses PyTorch's version counter, so call this after one. It also frees the memory.
    """
    _rows.cache_clear()  # the per-batch index tensors (small; shared by every model, rebuilt on the next forward)
    _guarded_index.cache_clear()
    if model is None:
        _STACK_CACHE.clear()
        return
    for module in model.modules():
        _STACK_CACHE.pop(module, None)


def _sources(layer: Any, present: tuple[str, ...]) -> list[torch.Tensor]:
    """The tensors a stack is built from (a B shared by consecutive adapters once; ``giva_out_index`` only changes
    with a new adapter, hence new vectors). Reads the containers' dicts directly: this runs every forward, for
    every layer, so it checks as few tensors as it can (a decoding step on a GPU waits for the host)."""
    a, b = layer.giva_A._buffers, layer.giva_B._buffers
    lambda_s, lambda_o = layer.giva_lambda_s._parameters, layer.giva_lambda_o._parameters
    sources = []
    last_b = None
    core = layer.giva_core._parameters
    for name in present:
        sources += (a[name], lambda_s[name], lambda_o[name])
        if name in core:
            sources.append(core[name])
        if b[name] is not last_b:
            last_b = b[name]
            sources.append(last_b)
    return sources


def _stacked(layer: Any, present: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> _Stacked:
    """The present adapters' stacked tensors for a forward without autograd: built once, reused until any source changes."""
    key = (present, device, dtype)
    sources = _sources(layer, present)
    entry = _STACK_CACHE.get(layer)
    try:
        # data_ptr: `.data = ...` swaps the storage without a version bump. A move or cast of the model also
        # changes the key's compute dtype / device (the input's).
        states = [(t.data_ptr(), t._version) for t in sources]
    except RuntimeError:  # inference tensors (created under torch.inference_mode) have no version counter
        return _build_stacked(layer, present, device, dtype, cached=False)
    if (
        entry is not None
        and entry.key == key
        and len(entry.sources) == len(sources)
        and all(ref() is t for ref, t in zip(entry.sources, sources))
        and entry.states == states
    ):
        return entry.stacked
    stacked = _build_stacked(layer, present, device, dtype)
    _STACK_CACHE[layer] = _CacheEntry(key, tuple(weakref.ref(t) for t in sources), states, stacked)
    return stacked


def _out_rows(layer: Any, name: str) -> tuple[int, ...]:
    """The output rows of W that adapter ``name``'s stacked B rows write, in order (from its blocks, on the host)."""
    return tuple(row for blk in layer.blocks[name] for row in range(blk.out_start, blk.out_start + blk.out_size))


def _build_stacked(layer: Any, present: tuple[str, ...], device: torch.device, dtype: torch.dtype, cached: bool = True) -> _Stacked:
    a_list = [layer.giva_A[n] for n in present]
    ranks = tuple(a.shape[0] for a in a_list)
    a = torch.cat([t.to(device, dtype) for t in a_list])
    lambda_s = torch.cat([torch.zeros(1, device=device, dtype=dtype)] + [layer.giva_lambda_s[n].to(device, dtype) for n in present])
    lambda_o_rows = [layer.giva_lambda_o[n].to(device, dtype) for n in present]
    layouts = [_out_rows(layer, n) for n in present]
    first_b = layer.giva_B[present[0]]
    shareable = not any(n in layer.giva_core._parameters for n in present)  # a core makes each B' its own
    if shareable and all(layer.giva_B[n] is first_b for n in present) and all(rows == layouts[0] for rows in layouts):
        out_index = None
        if layouts[0] != tuple(range(layer.out_features)):
            out_index = _index(layouts[0], device)
        lambda_o = torch.stack([torch.zeros_like(lambda_o_rows[0])] + lambda_o_rows)
        shared_b = first_b.to(device, dtype)
        guard = _guard(cached, a, lambda_s, shared_b, lambda_o, out_index)
        return _Stacked(a, lambda_s, ranks, shared_b, lambda_o, None, out_index, guard)
    union = tuple(sorted(set().union(*layouts)))
    position = {row: i for i, row in enumerate(union)}
    columns = []
    for name, rows in zip(present, layouts):
        block = layer.output_factor(name).to(device, dtype)  # O_p x R_p: diag(lambda_o) B (C), rounded once
        if rows != union:
            index = _index(tuple(position[row] for row in rows), device)
            block = block.new_zeros(len(union), block.shape[1]).index_copy(0, index, block)
        columns.append(block)
    b = torch.cat(columns, dim=1)
    out_index = None if union == tuple(range(layer.out_features)) else _index(union, device)
    return _Stacked(a, lambda_s, ranks, None, None, b, out_index, _guard(cached, a, lambda_s, b, out_index))


def generation_rows_per_input(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows transformers' ``generate`` makes of each input row: ``max(num_beams, num_return_sequences)`` of
    the ``generation_config`` given (else the model's), each overridden by a keyword of that name, as ``generate``
    resolves them (its ``_expand_inputs_for_generation``). 1 for a forward's keywords on a model without a
    generation config."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    counts = [kwargs.get(key, getattr(config, key, None)) for key in ("num_beams", "num_return_sequences")]
    return max([1, *(count for count in counts if isinstance(count, int))])


def _adapter_names_pre_forward_hook(
    target: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str], expanded: list[str]
) -> tuple[tuple, dict]:
    # Under generate the decoder sees each input row repeated (beams, returned sequences; ``expanded``), an encoder and
    # a plain forward the rows as given: a layer takes the names whose count is its batch's.
    rows = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() else None
    kwargs["adapter_names"] = expanded if rows == len(expanded) else adapter_names
    return args, kwargs


def _layers_of(root: nn.Module, types: tuple[type, ...]) -> list[nn.Module]:
    """The modules of ``types`` under ``root``, without walking inside them: a GiVA layer holds a submodule per
    adapter (its dropout), so ``root.modules()`` would visit ~N per layer, and this runs every forward."""
    found, seen, stack = [], set(), [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, types):
            found.append(module)
        else:
            stack.extend(child for child in module._modules.values() if child is not None)
    return found


@contextmanager
def mixed_batch_hooks(
    tuner: nn.Module,
    adapter_names: Any,
    known_adapters: set[str],
    hooked_types: tuple[type, ...],
    rows_per_input: int = 1,
) -> Iterator[None]:
    """Pass ``adapter_names`` to every GiVA layer for one forward / generate, as PEFT's LoRA does.

    Raises in training mode and for unknown names. ``generate`` runs the decoder on ``rows_per_input`` copies of each
    input row (:func:`generation_rows_per_input`): a layer whose batch has that many rows per name gets each name
    repeated so often; an encoder, which sees the original rows, gets them as given.
    """
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval() first.")
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), one per input row, got {adapter_names!r}")
    unknown = {name for name in adapter_names if name != BASE_ADAPTER_NAME} - known_adapters
    if unknown:
        raise ValueError(f"adapter_names names adapter(s) that do not exist: {', '.join(sorted(unknown))}")
    names = list(adapter_names)
    expanded = [name for name in names for _ in range(rows_per_input)] if rows_per_input > 1 else names
    hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=names, expanded=expanded)
    handles = []
    try:
        for module in _layers_of(tuner, hooked_types):
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
