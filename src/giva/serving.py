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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

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


@functools.lru_cache(maxsize=256)
def _batch_plan(names: tuple[str, ...]) -> tuple[tuple[str, ...], torch.Tensor]:
    """The distinct names of a batch (first-seen order) and, per row, the index of its name among them."""
    unique = tuple(dict.fromkeys(names))
    position = {name: i for i, name in enumerate(unique)}
    return unique, torch.tensor([position[name] for name in names], dtype=torch.long)


def _uniform(layer: Any, adapters: Sequence[str]) -> bool:
    """True if the adapters have bases of one shape on the same output rows (so they can be stacked)."""
    first = adapters[0]
    a_shape, b_shape = layer.giva_A[first].shape, layer.giva_B[first].shape
    index = layer.giva_out_index[first] if first in layer.giva_out_index else None
    for name in adapters[1:]:
        if layer.giva_A[name].shape != a_shape or layer.giva_B[name].shape != b_shape:
            return False
        other = layer.giva_out_index[name] if name in layer.giva_out_index else None
        if (index is None) != (other is None) or (index is not None and not torch.equal(index, other)):
            return False
    return True


def mixed_batch_forward(layer: Any, result: torch.Tensor, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
    """Add each row's adapter output to the base output ``result`` (``(batch, ..., out)``); ``x`` is ``(batch, ..., in)``.

    Rows whose name is ``"__base__"`` or an adapter this layer does not hold get nothing. For adapters of one
    layout, per row ``b``: ``h_b = (lambda_s_b * A_b) x_b`` by one ``bmm`` over the gathered, pre-scaled ``A``
    (``batch x R x in``), then ``result_b += h_b (lambda_o_b * B_b)^T`` by one ``baddbmm``, so the output is
    read and written once (no separate passes to scale by ``lambda_o`` and to add). The stacked per-adapter
    tensors are reused across forwards without autograd (see :func:`clear_mixed_batch_cache`).
    """
    unique, positions = _batch_plan(tuple(adapter_names))
    held = layer.giva_lambda_o._parameters  # the dict itself: this runs for every layer of every forward
    present = tuple(name for name in unique if name in held)
    if not present:
        return result
    for name in present:
        layer.ensure_bases(name)  # `weight` adapters built for loading compute their bases at first use
    if len(unique) == 1:  # every row uses one adapter: the plain single-adapter forward, no gather
        return layer._add_adapter_output(result, x, present[0])
    if layer.training:
        return _grouped_forward(layer, result, x, unique, positions, present)
    dtype = layer.giva_lambda_s[present[0]].dtype
    xb = layer._cast_input_dtype(x, dtype).reshape(x.shape[0], -1, x.shape[-1])  # batch x seq x in
    stacked = _stacked(layer, present, xb.device, xb.dtype)
    if stacked is None:  # adapters of different ranks / block layouts in this layer
        return _grouped_forward(layer, result, x, unique, positions, present)
    rows = _row_slots(unique, present, positions).to(xb.device)  # batch: 0 = no adapter in this layer
    # batch x seq x R; A x^T is the faster bmm layout for a rank this small
    h = torch.bmm(stacked.a.index_select(0, rows), xb.transpose(1, 2)).transpose(1, 2)
    if stacked.b is None:  # one B shared by every adapter: scale it per row, batch x O x R
        b = stacked.lambda_o.index_select(0, rows).unsqueeze(2) * stacked.shared_b
    else:
        b = stacked.b.index_select(0, rows)
    if stacked.out_index is None and result.dtype == h.dtype:
        result3 = result.reshape(x.shape[0], -1, result.shape[-1])
        if torch.is_grad_enabled() and (result.requires_grad or h.requires_grad or b.requires_grad):
            return torch.baddbmm(result3, h, b.transpose(1, 2)).reshape(result.shape)
        # In place: `result` is the base layer's fresh output and autograd does not need it.
        return result3.baddbmm_(h, b.transpose(1, 2)).reshape(result.shape)
    delta = torch.bmm(h, b.transpose(1, 2)).reshape(*x.shape[:-1], -1).to(result.dtype)
    if stacked.out_index is not None:
        return result.index_add(-1, stacked.out_index, delta)
    return result + delta


@dataclass(frozen=True)
class _Stacked:
    """The present adapters' tensors of one layer in compute dtype; slot 0 is all zeros (rows without an adapter)."""

    a: torch.Tensor  # (P + 1) x R x in: lambda_s-scaled A
    lambda_o: torch.Tensor  # (P + 1) x O
    shared_b: Optional[torch.Tensor]  # O x R when every adapter holds the same B, else None
    b: Optional[torch.Tensor]  # (P + 1) x O x R: lambda_o-scaled B, when the adapters' B differ
    out_index: Optional[torch.Tensor]  # the O output rows of a partly adapted fused layer, else None


@dataclass(frozen=True)
class _CacheEntry:
    key: tuple  # (present adapters, device, dtype)
    sources: tuple[weakref.ref, ...]  # the tensors the stack was built from
    states: tuple[tuple, ...]  # their (data_ptr, version, dtype, device, shape) at build time
    stacked: _Stacked


# One entry per layer: the stack of the last batch's adapters (autoregressive decoding repeats it every step).
_STACK_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_mixed_batch_cache(model: Optional[nn.Module] = None) -> None:
    """Drop the stacked adapter tensors kept between mixed-batch forwards (of ``model``'s layers, or of all).

    The cache notices adapters added, deleted or replaced, moved or cast, and every in-place write that
    PyTorch counts (optimizer steps, ``load_state_dict``, writes under ``torch.no_grad()``); a write through
    ``param.data`` bypasses PyTorch's version counter, so call this after one. It also frees the memory.
    """
    if model is None:
        _STACK_CACHE.clear()
        return
    for module in model.modules():
        _STACK_CACHE.pop(module, None)


def _sources(layer: Any, present: tuple[str, ...]) -> list[torch.Tensor]:
    """The tensors a stack is built from. Reads the containers' dicts directly: this runs every forward."""
    a, b, index = layer.giva_A._buffers, layer.giva_B._buffers, layer.giva_out_index._buffers
    lambda_s, lambda_o = layer.giva_lambda_s._parameters, layer.giva_lambda_o._parameters
    sources = []
    for name in present:
        sources += (a[name], b[name], lambda_s[name], lambda_o[name])
        if name in index:
            sources.append(index[name])
    return sources


def _state(tensor: torch.Tensor) -> tuple:
    # data_ptr: `.data = ...` (how nn.Module.to moves parameters) swaps the storage without a version bump
    return (tensor.data_ptr(), tensor._version, tensor.shape)


def _stacked(layer: Any, present: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> Optional[_Stacked]:
    """The present adapters' stacked tensors (None if their layouts differ): cached when autograd is off.

    With autograd on, they are built from the live vectors every time, so gradients reach them.
    """
    if torch.is_grad_enabled():
        return _build_stacked(layer, present, device, dtype)
    key = (present, device, dtype)
    sources = _sources(layer, present)
    entry = _STACK_CACHE.get(layer)
    try:
        states = tuple(_state(t) for t in sources)
    except RuntimeError:  # inference tensors (created under torch.inference_mode) have no version counter
        return _build_stacked(layer, present, device, dtype)
    if (
        entry is not None
        and entry.key == key
        and len(entry.sources) == len(sources)
        and all(ref() is t for ref, t in zip(entry.sources, sources))
        and entry.states == states
    ):
        return entry.stacked
    stacked = _build_stacked(layer, present, device, dtype)
    if stacked is None:
        _STACK_CACHE.pop(layer, None)
    else:
        _STACK_CACHE[layer] = _CacheEntry(key, tuple(weakref.ref(t) for t in sources), states, stacked)
    return stacked


def _build_stacked(layer: Any, present: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> Optional[_Stacked]:
    if not _uniform(layer, present):
        return None
    first = present[0]
    a_rows = [layer.giva_lambda_s[n].to(device, dtype).unsqueeze(1) * layer.giva_A[n].to(device, dtype) for n in present]
    a = torch.stack([torch.zeros_like(a_rows[0])] + a_rows)
    lambda_o_rows = [layer.giva_lambda_o[n].to(device, dtype) for n in present]
    lambda_o = torch.stack([torch.zeros_like(lambda_o_rows[0])] + lambda_o_rows)
    out_index = layer.giva_out_index[first].to(device) if first in layer.giva_out_index else None
    b_first = layer.giva_B[first]
    if all(layer.giva_B[n] is b_first for n in present):
        return _Stacked(a, lambda_o, b_first.to(device, dtype), None, out_index)
    b_rows = [lo.unsqueeze(1) * layer.giva_B[n].to(device, dtype) for n, lo in zip(present, lambda_o_rows)]
    return _Stacked(a, lambda_o, None, torch.stack([torch.zeros_like(b_rows[0])] + b_rows), out_index)


@functools.lru_cache(maxsize=256)
def _row_slots(unique: tuple[str, ...], present: tuple[str, ...], positions: torch.Tensor) -> torch.Tensor:
    """Per row, the slot of its adapter in :func:`_stacked` (1..P), or 0 when this layer does not hold it."""
    slot_of_unique = torch.zeros(len(unique), dtype=torch.long)
    for slot, name in enumerate(present, start=1):
        slot_of_unique[unique.index(name)] = slot
    return slot_of_unique[positions]


def _grouped_forward(
    layer: Any,
    result: torch.Tensor,
    x: torch.Tensor,
    unique: tuple[str, ...],
    positions: torch.Tensor,
    present: Sequence[str],
) -> torch.Tensor:
    """Fallback for adapters of different layouts (or training): one pass per adapter over its rows."""
    positions = positions.to(x.device)
    for name in present:
        rows = (positions == unique.index(name)).nonzero().squeeze(1)
        updated = layer._add_adapter_output(result.index_select(0, rows), x.index_select(0, rows), name)
        result = result.index_copy(0, rows, updated)
    return result


def _adapter_names_pre_forward_hook(target: nn.Module, args: tuple, kwargs: dict, adapter_names: list[str]):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _get_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model (it sees the un-expanded batch under beam search), else None."""
    get_encoder = getattr(model, "get_encoder", None)
    if callable(get_encoder) and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return get_encoder()
    return None


@contextmanager
def mixed_batch_hooks(
    tuner: nn.Module,
    adapter_names: Any,
    known_adapters: set[str],
    hooked_types: tuple[type, ...],
    num_beams: Any = None,
) -> Iterator[None]:
    """Pass ``adapter_names`` to every GiVA layer for one forward / generate, as PEFT's LoRA does.

    Raises in training mode and for unknown names; under beam search (``num_beams > 1``) each name is repeated
    ``num_beams`` times, as generation repeats each input row (an encoder still sees the original rows).
    """
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval() first.")
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), one per input row, got {adapter_names!r}")
    unknown = {name for name in adapter_names if name != BASE_ADAPTER_NAME} - known_adapters
    if unknown:
        raise ValueError(f"adapter_names names adapter(s) that do not exist: {', '.join(sorted(unknown))}")
    original = list(adapter_names)
    expanded = original
    if isinstance(num_beams, int) and num_beams > 1:
        expanded = [name for name in original for _ in range(num_beams)]
    handles = []
    try:
        for module in tuner.modules():
            if isinstance(module, hooked_types):
                hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=expanded)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        encoder = _get_encoder(getattr(tuner, "model", tuner))
        if expanded is not original and encoder is not None:
            for module in encoder.modules():
                if isinstance(module, hooked_types):
                    hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=original)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
