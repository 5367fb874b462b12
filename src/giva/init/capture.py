"""Hooks that hand ``(layer, x, dL/dy)`` of the GiVA-targeted layers to a sink, batch by batch; no maths.

For ``y = W x`` the weight gradient is ``sum over tokens of (dL/dy)^T x``, so a forward hook that passes the
layer's output through an identity autograd Function saving ``x`` (:class:`_Tap`, whose backward receives ``dL/dy``)
is all that is needed: no weight needs ``requires_grad``, no weight gradient is ever materialised, and activation
checkpointing frees and recomputes ``x`` as it does the model's own activations. Also here: the contexts that put a
model in its calibration state (adapters off, dropout off, checkpointing kept) and give it back as
it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from ..layer import GivaLayer
from ..precision import autocast_off
from .session import REENTRANT_CAUSE, GradientInitError

LossFn = Callable[[nn.Module, Any], torch.Tensor]
# Receives one layer's input and output gradient for one batch, as 2-D ``T x in`` and ``T x out``.
Sink = Callable[[str, torch.Tensor, torch.Tensor], None]


def giva_layers(model: nn.Module) -> dict[str, GivaLayer]:
    return {module.layer_name: module for module in model.modules() if isinstance(module, GivaLayer)}


def half_precision_vectors(model: nn.Module, adapter_names: Optional[Iterable[str]] = None) -> list[nn.Parameter]:
    """The trainable GiVA parameters (the vectors, and the opt-in core) held in fp16/bf16, of ``adapter_names``
    (default: every adapter). ``lambda_s`` starts at 1, where bf16 cannot hold an update below 0.004."""
    names = None if adapter_names is None else set(adapter_names)
    return [param for layer in giva_layers(model).values() for attr in GivaLayer.adapter_layer_names
            for name, param in getattr(layer, attr).items()
            if (names is None or name in names) and param.requires_grad and param.dtype in (torch.float16, torch.bfloat16)]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DeepSpeed engine wrapper (FSDP2 modules are not wrappers)."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors on ``device``, of its own type: a mapping type that rebuilds from a dict stays that
    type (transformers' ``BatchEncoding``, whose attribute access a ``loss_fn`` may use, came back a plain dict), and a
    namedtuple a namedtuple (rebuilt from a generator it raised a ``TypeError`` naming a missing field)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        if type(batch) is dict:
            return moved
        try:
            return type(batch)(moved)
        except Exception:  # noqa: BLE001 - a mapping that does not rebuild from a dict (defaultdict): a plain dict
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# TRL's preference / completion batches: keys that are not model inputs (its DPO trainer drops the same).
# KTO's also carry ``label``, ``ref_*`` and its KL batch ``KL_*`` (prefixes).
_TRL_NON_MODEL_KEYS = ("completion_mask", "label")
_TRL_NON_MODEL_PREFIXES = ("ref_", "KL_")
RAW_ROWS_LOSS_FN = (
    "def loss_fn(model, rows):\n"
    "    enc = tokenizer([row['prompt'] for row in rows], return_tensors='pt', padding=True).to(model.device)\n"
    "    return model(**enc, labels=enc['input_ids'].masked_fill(enc['attention_mask'] == 0, -100)).loss"
)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss``. A dict batch with ``completion_mask`` and no ``labels`` (TRL's DPO / KTO convention) is
    taken with ``labels = input_ids`` masked to the completion (-100 elsewhere; the model shifts them), the mask itself
    and TRL's other non-inputs (``label``, ``ref_*``, KTO's ``KL_*``) left out of the model call: the negative log-likelihood of the completions."""
    if not isinstance(batch, Mapping):
        if isinstance(batch, (list, tuple)) and batch and all(isinstance(row, Mapping) for row in batch):
            raise GradientInitError(
                f"batches are lists of raw rows (dicts with keys {sorted(batch[0])}, as TRL's GRPO / RLOO loaders give), "
                "not dicts of model inputs: pass a loss_fn(model, batch) -> loss that tokenizes them, for instance\n"
                + RAW_ROWS_LOSS_FN
            )
        raise GradientInitError(
            f"batches are {type(batch).__name__}, not dicts of model inputs: pass loss_fn(model, batch) -> loss"
        )
    if "labels" not in batch and "completion_mask" in batch and "input_ids" in batch:
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        inputs = {key: value for key, value in batch.items()
                  if key not in _TRL_NON_MODEL_KEYS and not key.startswith(_TRL_NON_MODEL_PREFIXES)}
        batch = {**inputs, "labels": labels}
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None:
        if isinstance(outputs, tuple):
            raise GradientInitError(
                "the model returned a tuple, not an output with .loss (return_dict=False in its config or the batch): "
                "set return_dict=True, or pass loss_fn(model, batch) -> loss"
            )
        raise GradientInitError(
            "the model returned no .loss: include labels in the batches or pass loss_fn(model, batch) -> loss"
        )
    return loss


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the pretrained model: switch every PEFT tuner layer and modules_to_save wrapper off.

    The private flag is set directly because PEFT's ``enable_adapters(True)`` / ``disable_adapter()``
    re-mark the active adapters trainable, which would unfreeze tensors a user froze.
    """
    switches = [m for m in model.modules() if hasattr(m, "_disable_adapters")]
    states = [m._disable_adapters for m in switches]
    # A loss_fn may toggle adapters itself (TRL's DPO loss runs its reference under PeftModel.disable_adapter(),
    # which, finding them disabled here, freezes every adapter tensor and does not unfreeze it on exit): every
    # requires_grad flag is given back as it was.
    params = list(model.parameters())
    trainable = [param.requires_grad for param in params]
    try:
        for module in switches:
            module._disable_adapters = True
        yield
    finally:
        for module, state in zip(switches, states):
            module._disable_adapters = state
        for param, flag in zip(params, trainable):
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def _reentrant(function: partial) -> bool:
    """Whether a checkpointing partial runs reentrantly: ``use_reentrant=True`` given, or not given to
    ``torch.utils.checkpoint.checkpoint`` itself, whose default is reentrant."""
    reentrant = function.keywords.get("use_reentrant")
    return reentrant is True or (reentrant is None and function.func is torch.utils.checkpoint.checkpoint)


# Name endings of the float rates a module reads in its forward when training (dropout, LayerDrop's layer skipping).
TRAINING_RATES = ("dropout", "layerdrop", "pdrop", "drop_prob")


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """Deterministic calibration that keeps the model's activation checkpointing.

    Every module goes to eval mode (no dropout; its ``training`` flag, as ``nn.Module.train`` sets it, without any
    override's side effects, and restored the same way) except those with activation checkpointing on
    (transformers only checkpoints layers in training mode); the float rates that their forward reads in training
    mode, their own and their config's (:data:`TRAINING_RATES`: ``*dropout``, LayerDrop's ``*layerdrop``, ``*pdrop``,
    ``*drop_prob``), are zeroed meanwhile (a BART encoder or wav2vec2 left its LayerDrop on: layers skipped at random,
    the bases changed from run to run and the caller's RNG moved). Reentrant checkpointing
    (``use_reentrant=True``, which TRL asks for under DeepSpeed ZeRO-3) runs the first forward with
    autograd off and supports no ``torch.autograd.grad``: those layers checkpoint non-reentrantly
    meanwhile, which keeps the same activations. A transformers config that turns the KV cache on has it off
    meanwhile, whatever the loss function: a calibration never reads a cache, and with one transformers drops the
    attention mask of padding-free packed rows (TRL's ``padding_free`` / packing batches, told apart by
    ``position_ids``), whose tokens then attended across rows. Everything is restored afterwards.
    """
    modes = {module: module.training for module in model.modules()}
    caches = {id(c): c for m in modes if getattr(c := getattr(m, "config", None), "use_cache", None) is True}
    rates: list[tuple[Any, str, float]] = []  # (a module or its config, attribute, rate), zeroed meanwhile
    functions: dict[nn.Module, Any] = {}
    for module in modes:  # the flags only, not model.eval(): a train() override has side effects of its own
        module.training = False  # (transformers' use_kernels would kernelize for inference, then calibrate through it)
    for config in caches.values():
        config.use_cache = False
    try:
        owners: dict[int, Any] = {}  # the checkpointing modules and their configs (a config shared by many, once)
        for module in model.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.training = True
                for owner in (module, getattr(module, "config", None)):
                    if owner is not None:
                        owners[id(owner)] = owner
                function = getattr(module, "_gradient_checkpointing_func", None)
                if isinstance(function, partial) and _reentrant(function):
                    functions[module] = function
        rates = [(owner, name, value) for owner in owners.values() for name, value in vars(owner).items()
                 if name.endswith(TRAINING_RATES) and isinstance(value, float) and value > 0]
        for module, name, _ in rates:
            setattr(module, name, 0.0)
        for module, function in functions.items():
            module._gradient_checkpointing_func = partial(function.func, *function.args,
                                                          **{**function.keywords, "use_reentrant": False})
        yield
    finally:
        for module, function in functions.items():
            module._gradient_checkpointing_func = function
        for module, name, value in rates:
            setattr(module, name, value)
        for module, training in modes.items():
            module.training = training
        for config in caches.values():
            config.use_cache = True


class _Tap(torch.autograd.Function):
    """``output + probe`` (a zero) whose backward hands ``(name, x, dL/dy)`` to a sink, ``x`` and ``dL/dy`` as 2-D ``T x in`` and
    ``T x out``.

    ``x`` is a saved tensor of the graph (not held by a hook's closure), so activation checkpointing frees it after
    the forward and recomputes it for the backward as it does the model's own activations: a calibration keeps what a
    checkpointed training step keeps. The recomputed forward taps again, off the backward graph: that tap's backward
    never runs, so each batch reaches the sink once per layer. The output is a new tensor, not a view, so a model may
    modify it in place.
    """

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, probe: torch.Tensor, x: torch.Tensor, sink: Sink, name: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.sink, ctx.name = sink, name
        return output + probe

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None, None]:
        try:
            (x,) = ctx.saved_tensors
        except RuntimeError as exc:  # autograd's version check: the input changed after the layer read it
            if "modified by an inplace operation" not in str(exc):
                raise
            raise GradientInitError(
                f"the input of GiVA layer {ctx.name!r} was modified in place after the layer ran (an in-place op "
                "such as h.mul_() or h += ... on the tensor the layer took): its gradient dL/dW needs that input as the "
                "layer saw it; make the operation out of place, or leave this layer out of target_modules"
            ) from exc
        ctx.sink(ctx.name, x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1]))
        return (grad_y if ctx.needs_input_grad[0] else None), None, None, None, None


class Capture:
    """While attached, each backward through a hooked layer calls ``sink(layer_name, x, dL/dy)``."""

    def __init__(self, layers: dict[str, nn.Module], sink: Sink) -> None:
        self.layers = layers
        self.sink = sink
        self.probes: list[torch.Tensor] = []
        # Of the current batch: targets whose forward ran with autograd off (skipped), and with it on (hooked).
        self.skipped: set[str] = set()
        self.hooked: set[str] = set()

    def _forward_hook(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # A forward with autograd off cannot contribute a gradient: left alone. A loss_fn may run one on purpose (a
        # reference or teacher forward under torch.no_grad()); if a layer only ever runs so (reentrant activation
        # checkpointing, whose first forward is under no_grad), the "received no gradient" check names it.
        if not torch.is_grad_enabled():
            self.skipped.add(name)
            return output
        self.hooked.add(name)
        # The zero probe puts the output on the graph even when nothing upstream requires grad (frozen model,
        # adapters disabled); autograd.grad over the probes then reaches every target.
        probe = torch.zeros((), device=output.device, dtype=output.dtype, requires_grad=True)
        self.probes.append(probe)
        return _Tap.apply(output, probe, args[0].detach(), self.sink, name)

    @contextmanager
    def attached(self) -> Iterator["Capture"]:
        handles = [layer.register_forward_hook(partial(self._forward_hook, name)) for name, layer in self.layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.probes.clear()
            self.skipped.clear()
            self.hooked.clear()

    def forward(self, model: nn.Module, batch: Any, loss_fn: Optional[LossFn]) -> Any:
        """The loss of one batch, unchecked (see :meth:`check_loss`); the backward is separate so that the
        ranks of a distributed run can agree in between."""
        self.probes.clear()
        self.skipped.clear()
        self.hooked.clear()
        with torch.enable_grad():
            return (loss_fn or default_loss)(model, batch)

    def check_loss(self, loss: Any, index: int) -> float:
        """The value of :meth:`forward`'s loss; a GradientInitError unless it is a finite scalar on the targets' path."""
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise GradientInitError(f"the loss of calibration batch {index} is not a scalar tensor: {loss!r}")
        if not loss.requires_grad:
            only_off = sorted(self.skipped - self.hooked)
            if only_off:
                raise GradientInitError(
                    f"GiVA layer(s) {only_off[:5]} ran only with autograd off in calibration batch {index}, so the loss "
                    f"does not depend on any GiVA-targeted layer, as under {REENTRANT_CAUSE}"
                )
            raise GradientInitError("the loss does not depend on any GiVA-targeted layer: check target_modules and loss_fn")
        value = loss.item()
        if value != value or value in (float("inf"), float("-inf")):
            raise GradientInitError(
                f"calibration batch {index} gave a non-finite loss ({value}); check that batch's inputs "
                "and labels, or the model's dtype"
            )
        return value

    def fp16_outputs(self) -> bool:
        """Whether a hooked layer's output of the last :meth:`forward` was fp16 (an fp16 model, or fp16 autocast), so that
        its output gradient, which the sink receives, is fp16 too: the loss needs scaling."""
        return any(probe.dtype == torch.float16 for probe in self.probes)

    def backward(self, loss: torch.Tensor, scale: float = 1.0) -> None:
        """The backward of :meth:`forward`'s loss, seeded with ``scale`` (``d(scale * loss)``: the sink receives the output
        gradients multiplied by it; the loss itself is not multiplied, so an fp16 loss does not overflow): the sink
        sees every hooked layer."""
        try:
            seed = None if scale == 1.0 else torch.full_like(loss, scale)
            # outside the caller's autocast, as a Trainer's backward runs (Accelerate wraps only the forward) and as
            # PyTorch advises: under it the backward's fp32 matmuls (transformers' attention on CPU, torch 2.6-2.8)
            # were recast to bf16. A checkpointed block's recomputation restores its forward's autocast state itself.
            with autocast_off(loss.device):
                torch.autograd.grad(loss, self.probes, grad_outputs=seed, allow_unused=True)
        except RuntimeError as exc:
            if "use_reentrant=True" in str(exc) or "incompatible with .grad()" in str(exc):
                raise GradientInitError(
                    f"the calibration backward runs through {REENTRANT_CAUSE}, which supports no torch.autograd.grad"
                ) from exc
            raise
        finally:
            self.probes.clear()
