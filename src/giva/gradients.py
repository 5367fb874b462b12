"""Capture dL/dW of the GiVA-targeted layers over calibration batches and turn it into bases.

For a linear map ``y = W x`` the weight gradient is ``dL/dW = sum over tokens of (dL/dy)^T x``, so
it is assembled from a forward hook (``x``) and a tensor hook on the layer's output (``dL/dy``):
no weight ever needs ``requires_grad`` and no full-model gradient is ever materialised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .bases import GRADIENT_VARIANTS, bases_from_gradient, layer_generator
from .config import GivaConfig
from .layer import GivaLayer

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]

# Calibration batches averaged into the gradient. The paper uses 1; on MiniLM / Pang & Lee, 4
# batches gave 75.2 % vs 72.0 % test accuracy (benchmarks/results/full, ablation k4), and the
# combined default recipe of `giva finetune` 79.6 % vs 75.5 % (README).
DEFAULT_NUM_BATCHES = 4


class GradientInitError(RuntimeError):
    """The calibration pass could not produce usable gradients (no loss, NaN loss, a layer off the loss path)."""


@dataclass
class InitReport:
    """What `initialize` did and how long it took (seconds)."""

    adapters: list[str]
    layers: int
    num_batches: int
    gradient_seconds: float = 0.0
    svd_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return self.gradient_seconds + self.svd_seconds


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise GradientInitError(
            f"batches are {type(batch).__name__}, not dicts of model inputs: pass loss_fn(model, batch) -> loss"
        )
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise GradientInitError(
            "the model returned no .loss: include labels in the batches or pass loss_fn(model, batch) -> loss"
        )
    return loss


class _GradientRecorder:
    """Accumulates ``sum (dL/dy)^T x`` (``out x in``, fp32) for each hooked layer."""

    def __init__(self, layers: dict[str, GivaLayer]) -> None:
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self.probes: list[torch.Tensor] = []

    def _forward_hook(self, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].detach()
        # The zero probe makes the output part of the graph even when nothing upstream requires grad
        # (frozen model, adapters disabled); autograd.grad over the probes then reaches every target.
        probe = torch.zeros((), device=output.device, dtype=output.dtype, requires_grad=True)
        self.probes.append(probe)
        output = output + probe
        output.register_hook(partial(self.accumulate, name, x))
        return output

    def accumulate(self, name: str, x: torch.Tensor, grad_y: torch.Tensor) -> None:
        g = grad_y.reshape(-1, grad_y.shape[-1]).float()
        contribution = g.mT @ x.reshape(-1, x.shape[-1]).float()  # out x in
        if name in self.sums:
            self.sums[name] += contribution
        else:
            self.sums[name] = contribution

    @contextmanager
    def attached(self) -> Iterator[None]:
        handles = [layer.register_forward_hook(partial(self._forward_hook, name)) for name, layer in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Deterministic calibration (no dropout); every module's own train/eval flag is restored."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def compute_gradients(
    model: nn.Module,
    layers: dict[str, GivaLayer],
    dataloader: Iterable[Any],
    num_batches: int = DEFAULT_NUM_BATCHES,
    loss_fn: Optional[LossFn] = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Mean over ``num_batches`` batches of ``dL/dW`` (``out x in``, fp32) for each named layer.

    The model is run as it is (callers disable the adapters to get the gradient at the
    pretrained checkpoint); in a distributed run the sums are all-reduced over ranks.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    loss_fn = loss_fn or _default_loss
    device = next(model.parameters()).device
    recorder = _GradientRecorder(layers)
    losses: list[float] = []
    batches = islice(iter(dataloader), num_batches)
    with recorder.attached(), _eval_mode(model):
        for index, batch in enumerate(tqdm(batches, total=num_batches, desc="GiVA gradient", disable=not progress)):
            recorder.probes.clear()
            with torch.enable_grad():
                loss = loss_fn(model, _to_device(batch, device))
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise GradientInitError(f"the loss of calibration batch {index} is not a scalar tensor: {loss!r}")
                if not torch.isfinite(loss):
                    raise GradientInitError(
                        f"calibration batch {index} gave a non-finite loss ({loss.item()}); check that batch's inputs "
                        "and labels, or the model's dtype"
                    )
                if not loss.requires_grad:
                    raise GradientInitError(
                        "the loss does not depend on any GiVA-targeted layer: check target_modules and loss_fn"
                    )
                torch.autograd.grad(loss, recorder.probes, allow_unused=True)
            losses.append(loss.item())
    if len(losses) < num_batches:
        raise GradientInitError(f"the dataloader gave {len(losses)} batches but num_batches={num_batches} were asked for")
    missing = [name for name in layers if name not in recorder.sums]
    if missing:
        raise GradientInitError(
            f"GiVA layer(s) {missing[:5]} received no gradient (not on the path from inputs to loss); "
            "remove them from target_modules"
        )
    gradients = recorder.sums
    if _distributed():
        world = dist.get_world_size()
        for name in layers:
            gradients[name] = gradients[name].contiguous()  # gloo scrambles non-contiguous tensors
            dist.all_reduce(gradients[name])
            gradients[name] /= world
    for name in layers:
        gradients[name] /= num_batches
    return gradients, losses


def bases_for_layer(
    layer: GivaLayer, adapter_name: str, gradient: torch.Tensor, config: GivaConfig
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A_j, B_j) for each adapted block of ``layer`` from its full ``out x in`` gradient."""
    result = []
    for blk in layer.blocks[adapter_name]:
        g = gradient[blk.out_start : blk.out_start + blk.out_size]
        if not torch.any(g != 0):
            raise GradientInitError(
                f"GiVA layer {layer.layer_name!r} (block {blk.index}) received an all-zero gradient; "
                "it does not affect the loss on the calibration data"
            )
        generator = layer_generator(config.seed, layer.layer_name, blk.index)
        result.append(bases_from_gradient(g, blk.rank, config.variant, generator, svd=config.svd, svd_seed=config.seed))
    return result


def giva_layers(model: nn.Module) -> dict[str, GivaLayer]:
    return {module.layer_name: module for module in model.modules() if isinstance(module, GivaLayer)}


def giva_configs(model: nn.Module) -> dict[str, GivaConfig]:
    configs = getattr(model, "peft_config", {}) or {}
    return {name: cfg for name, cfg in configs.items() if isinstance(cfg, GivaConfig)}


@contextmanager
def _adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the pretrained model: PeftModel.disable_adapter() when available, else switch GiVA layers off."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    layers = list(giva_layers(model).values())
    states = [layer.disable_adapters for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, disabled in zip(layers, states):
            layer.enable_adapters(not disabled)


def bases_initialized(model: nn.Module, adapter_name: str = "default") -> bool:
    """True if every GiVA layer of ``adapter_name`` holds bases (data-free variants always do)."""
    layers = [layer for layer in giva_layers(model).values() if adapter_name in layer.giva_A]
    if not layers:
        raise ValueError(f"the model has no GiVA adapter named {adapter_name!r}")
    return all(layer.bases_initialized(adapter_name) for layer in layers)


def initialize(
    peft_model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: int = DEFAULT_NUM_BATCHES,
    loss_fn: Optional[LossFn] = None,
    adapter_name: Optional[str] = None,
    progress: bool = True,
) -> InitReport:
    """Fill the bases of GiVA adapters from the loss gradient at the pretrained checkpoint.

    Args:
        peft_model: the model returned by ``get_peft_model`` (or any model holding GiVA layers).
        dataloader: calibration batches, e.g. the training dataloader; the first ``num_batches`` are used.
        num_batches: k, the number of batches whose gradients are averaged (default 4; the paper used 1).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        adapter_name: initialise only this adapter; default every GiVA adapter with gradient bases.
        progress: show a progress bar.

    The gradient is taken with all adapters disabled (the pretrained model), in eval mode; train/eval
    flags are restored and no ``requires_grad`` flag is touched. Bases are written in place, so this can
    run before or after the optimizer is built. Data-free variants (``random``, ``weight``) need no call.
    """
    configs = giva_configs(peft_model)
    if adapter_name is not None:
        if adapter_name not in configs:
            raise ValueError(f"no GiVA adapter named {adapter_name!r}; the model has {sorted(configs)}")
        configs = {adapter_name: configs[adapter_name]}
    if not configs:
        raise ValueError("the model has no GiVA adapter: wrap it with peft.get_peft_model(model, giva.GivaConfig(...))")
    to_init = {name: cfg for name, cfg in configs.items() if cfg.variant in GRADIENT_VARIANTS}
    all_layers = giva_layers(peft_model)
    layers = {key: layer for key, layer in all_layers.items() if any(name in layer.giva_A for name in to_init)}
    report = InitReport(adapters=sorted(to_init), layers=len(layers), num_batches=num_batches)
    if not to_init:
        logger.info("GiVA adapters %s use data-free bases; nothing to initialise", sorted(configs))
        return report

    start = time.perf_counter()
    with _adapters_disabled(peft_model):
        gradients, report.losses = compute_gradients(peft_model, layers, dataloader, num_batches, loss_fn, progress)
    report.gradient_seconds = time.perf_counter() - start

    start = time.perf_counter()
    rank0 = not _distributed() or dist.get_rank() == 0
    for name, cfg in to_init.items():
        for key, layer in tqdm(layers.items(), desc=f"GiVA SVD ({name})", disable=not progress):
            if name not in layer.giva_A:
                continue
            blocks = layer.blocks[name]
            if rank0:
                pairs = bases_for_layer(layer, name, gradients[key], cfg)
            else:
                pairs = [(torch.empty(b.rank, layer.in_features), torch.empty(b.out_size, b.rank)) for b in blocks]
            if _distributed():
                device = gradients[key].device
                pairs = [(a.to(device).contiguous(), b.to(device).contiguous()) for a, b in pairs]
                for tensor in (t for pair in pairs for t in pair):
                    dist.broadcast(tensor, src=0)
            for blk, (a, b) in zip(blocks, pairs):
                layer.set_block_bases(name, blk, a, b)
        cfg.bases_info = {
            "source": "gradient",
            "variant": cfg.variant,
            "num_batches": num_batches,
            "seed": cfg.seed,
            "svd": cfg.svd,
            "dtype": "float32",
            "calibration_loss": [round(x, 6) for x in report.losses],
        }
    report.svd_seconds = time.perf_counter() - start
    del gradients
    logger.info(
        "GiVA bases for %s on %d layers: gradient %.2fs, SVD %.2fs",
        report.adapters, report.layers, report.gradient_seconds, report.svd_seconds,
    )
    return report
