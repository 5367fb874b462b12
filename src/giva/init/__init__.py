"""`giva.initialize`: bases from the loss gradient at the pretrained checkpoint, exact or sketched.

The work is split by concern: ``capture.py`` (hooks giving ``(x, dL/dy)``), ``exact.py`` (dense
gradient then SVD), ``sketch.py`` (pure streaming range finder that never forms the gradient),
``session.py`` (the pass-based protocol shared by one process, torch.distributed and federated
clients), ``distributed.py`` (the collectives) and ``accumulate.py`` (one pass over the batches).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from ..bases import GRADIENT_VARIANTS
from ..config import GivaConfig
from .accumulate import BatchRng, LossScale, accumulate, check_num_batches, loader_length, run_pass
from .capture import LossFn, giva_layers, half_precision_vectors, unwrap
from .distributed import Collective, DistributedInitError, DistributedValueError, collective, zero3_trace_reset
from .session import (
    NO_GRADIENT_CAUSES,
    STATISTICS,
    GradientInitError,
    InitSession,
    Partial,
    Request,
    RequestItem,
    Statistic,
    Target,
    check_gradient_sum,
    check_statistic,
)
from .sketch import DEFAULT_OVERSAMPLING, DEFAULT_PASSES

logger = logging.getLogger(__name__)

# Calibration batches averaged into the gradient. The paper uses 1. In the evidence suite (validation-chosen
# LRs, 5 seeds, test scored once) k=1 - k=4 is -0.63 [-1.93, +0.67] points, and every batch of the training
# set ("all") - k=4 is +1.64 [+0.02, +3.36] (Pang & Lee) and +2.32 [+0.12, +4.52] (CoNLL-2010)
# (benchmarks/results/evidence/results.md). "all" costs a forward and backward over the whole training
# set per pass, so the library keeps a bounded default and `giva finetune` (small classification sets) uses "all".
DEFAULT_NUM_BATCHES = 4

NumBatches = Union[int, Literal["all"]]
# mode="auto" takes the exact path while the dense fp32 gradients of all targets fit in this
# many bytes: one pass instead of DEFAULT_PASSES, and the memory is small next to any model that
# size (MiniLM on every linear layer: 84 MB); beyond it, the sketch.
AUTO_EXACT_MAX_BYTES = 256 * 2**20

InitMode = Literal["auto", "sketch", "exact"]

__all__ = [
    "AUTO_EXACT_MAX_BYTES",
    "DEFAULT_NUM_BATCHES",
    "DEFAULT_OVERSAMPLING",
    "DEFAULT_PASSES",
    "DistributedInitError",
    "DistributedValueError",
    "GradientInitError",
    "InitReport",
    "InitSession",
    "LossScale",
    "NumBatches",
    "Partial",
    "Request",
    "RequestItem",
    "STATISTICS",
    "Statistic",
    "Target",
    "accumulate",
    "bases_initialized",
    "check_gradient_sum",
    "choose_mode",
    "compute_gradients",
    "giva_configs",
    "giva_layers",
    "initialize",
    "targets_of",
    "write_bases",
]


@dataclass
class InitReport:
    """What `initialize` did and how long it took (seconds)."""

    adapters: list[str]
    layers: int
    num_batches: int
    gradient_seconds: float = 0.0
    svd_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    mode: str = "exact"
    passes: int = 1
    sums_bytes: int = 0  # per pass: what each process holds and all-reduces (dense G in exact mode)
    # Targets (``adapter:layer#block``) this process computed whose gradient had fewer non-zero singular values than
    # the bases need: (found, needed). A warning names them.
    rank_deficient: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return self.gradient_seconds + self.svd_seconds


def giva_configs(model: nn.Module) -> dict[str, GivaConfig]:
    configs = getattr(unwrap(model), "peft_config", {}) or {}
    return {name: cfg for name, cfg in configs.items() if isinstance(cfg, GivaConfig)}


def bases_initialized(model: nn.Module, adapter_name: str = "default") -> bool:
    """True if every GiVA layer of ``adapter_name`` holds bases (data-free variants always do)."""
    layers = [layer for layer in giva_layers(unwrap(model)).values() if adapter_name in layer.giva_A]
    if not layers:
        raise ValueError(f"the model has no GiVA adapter named {adapter_name!r}")
    return all(layer.bases_initialized(adapter_name) for layer in layers)


def targets_of(model: nn.Module, configs: dict[str, GivaConfig]) -> list[Target]:
    """One :class:`Target` per adapted block of every GiVA layer of the given gradient-variant adapters."""
    targets = []
    for layer in giva_layers(unwrap(model)).values():
        for name, cfg in configs.items():
            for blk in layer.blocks.get(name, ()):
                targets.append(
                    Target(name, layer.layer_name, blk.index, blk.out_start, blk.out_size, layer.in_features,
                           blk.rank, cfg.variant, cfg.seed, cfg.svd)
                )
    return targets


def choose_mode(mode: str, targets: Iterable[Target], statistic: str = "mean") -> str:
    """``mode="auto"``: exact while the dense fp32 sums (``out x in`` gradients, or ``in x in`` second moments)
    fit in AUTO_EXACT_MAX_BYTES, else sketch."""
    if mode != "auto":
        return mode
    dense = sum(4 * (t.in_features if statistic == "second-moment" else t.out_size) * t.in_features for t in targets)
    return "exact" if dense <= AUTO_EXACT_MAX_BYTES else "sketch"


def write_bases(model: nn.Module, session: InitSession) -> None:
    """Copy a finished session's bases into the GiVA layers (in place, fp32)."""
    layers = giva_layers(unwrap(model))
    for key, (a, b) in session.bases().items():
        target = session.targets[key]
        layer = layers[target.layer]
        block = next(blk for blk in layer.blocks[target.adapter] if blk.index == target.block)
        layer.set_block_bases(target.adapter, block, a, b)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's share of a parameter: an FSDP2 DTensor's local shard, a ZeRO-3 parameter's partition."""
    if hasattr(tensor, "ds_tensor"):  # DeepSpeed ZeRO-3: the parameter itself is empty outside its gather
        return tensor.ds_tensor
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _trained(layer: Any, name: str) -> bool:
    """The vectors are no longer an identity pair: both are non-zero somewhere (at init one of them is all zero)."""
    return bool(_local(layer.giva_lambda_o[name]).any()) and bool(_local(layer.giva_lambda_s[name]).any())


# Modules whose forward gathers parameters (FSDP1's wrapper, FSDP2's fully_shard class), by class name: FSDP2's
# FSDPModule moved between torch releases, and the check must not import torch.distributed where it is absent.
_SHARDING_MODULES = ("FullyShardedDataParallel", "FSDPModule")


def _sharded(model: nn.Module) -> bool:
    """True if the model's forward runs collectives of its own: an FSDP1 or FSDP2 module anywhere in it (FSDP1 with
    ``use_orig_params=True``, the Accelerate and Trainer default, shows plain Parameters), FSDP2 DTensors, FSDP1 flat
    parameters, ZeRO-3 partitioned parameters."""
    return any(
        hasattr(p, "ds_tensor") or type(p).__name__ in ("DTensor", "FlatParameter") for p in model.parameters()
    ) or any(cls.__name__ in _SHARDING_MODULES for module in model.modules() for cls in type(module).__mro__)


def _already_initialised(model: nn.Module, names: Iterable[str]) -> list[str]:
    layers = giva_layers(model).values()
    return [
        name for name in names
        if any(name in layer.giva_A and (layer.bases_initialized(name) or _trained(layer, name)) for layer in layers)
    ]


def _already_initialised_message(trained: list[str], selected: Iterable[str], adapter_name: Optional[str]) -> str:
    """Why ``initialize`` refuses: force=True would recompute the bases under trained vectors, so when the call also
    selected adapters still to initialise (``adapter_name`` left out after ``add_adapter``) the message names those."""
    fresh = sorted(set(selected) - set(trained))
    message = f"GiVA adapter(s) {trained} already hold bases or trained vectors; initialize would replace the bases under them"
    if adapter_name is None and fresh:
        return (f"{message}. To initialise only {fresh}, pass adapter_name={fresh[0]!r}"
                + (" (once per adapter)" if len(fresh) > 1 else "")
                + "; force=True would recompute every selected adapter's bases, the trained ones' too.")
    return f"{message}. Pass force=True to re-initialise (the vectors trained on the old bases no longer fit the new ones)."


def _batches(dataloader: Iterable[Any], num_batches: int, keep: bool) -> Iterator[Iterator[Any]]:
    """An iterator over the same ``num_batches`` batches for every pass (kept after the first if ``keep``: the batch
    objects as the loader gave them, all of them until the last pass)."""
    def lazy() -> Iterator[Any]:  # iter() runs at the first next(), where run_pass catches a failing loader
        # not `yield from`: closing this generator once its batches are taken would close the caller's generator
        # with it, and the training loop after initialize would get no batch, silently
        for batch in dataloader:
            yield batch

    if not keep:
        yield lazy()
        return
    kept: list[Any] = []

    def first() -> Iterator[Any]:
        for batch in islice(lazy(), num_batches):
            kept.append(batch)
            yield batch

    yield first()
    while True:
        yield iter(kept)


def initialize(
    peft_model: nn.Module,
    dataloader: Iterable[Any],
    num_batches: NumBatches = DEFAULT_NUM_BATCHES,
    loss_fn: Optional[LossFn] = None,
    adapter_name: Optional[str] = None,
    progress: bool = True,
    *,
    mode: InitMode = "auto",
    passes: int = DEFAULT_PASSES,
    oversampling: Optional[int] = DEFAULT_OVERSAMPLING,
    statistic: Statistic = "mean",
    force: bool = False,
) -> InitReport:
    """Fill the bases of GiVA adapters from the loss gradient at the pretrained checkpoint.

    Args:
        peft_model: the model returned by ``get_peft_model`` (or any model holding GiVA layers), also
            wrapped by DDP, sharded by FSDP2 ``fully_shard``, or a DeepSpeed ZeRO-3 engine (weights stay
            partitioned: the hooks need only activations and output gradients, sizes come from the
            layers, which PEFT read from ``ds_shape`` under ``zero.Init``).
        dataloader: calibration batches, e.g. the training dataloader; the first ``num_batches`` are used.
        num_batches: k, the number of batches whose gradients are averaged (default 4; the paper used 1), or
            ``"all"``: every batch of ``dataloader`` (``len(dataloader)``; the same on every rank, or every rank
            raises). On MiniLM "all" beat k=4 by 1.6-2.3 points (README, "Closing the gap to LoRA") at the cost
            of a forward and backward over the whole training set per pass (one pass in exact mode, ``passes`` in
            sketch mode, which also keeps every batch the loader gave until its last pass: see ``mode``).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        adapter_name: initialise only this adapter; default every GiVA adapter with gradient bases.
        progress: show a progress bar.
        mode: ``"exact"`` accumulates each targeted layer's dense fp32 gradient ``G`` (``out x in``,
            4 bytes per targeted weight) in one pass, then takes its SVD. ``"sketch"`` never forms
            ``G``: a randomized range finder accumulates ``G^T M`` / ``G M`` products of
            ``(in + out) * l`` numbers per layer (``l = k + oversampling``, k = r, or 2r for VrU2r)
            over ``passes`` passes of the same k batches, then an exact SVD of the small product.
            ``"auto"`` (default): exact when the dense gradients of all targeted layers take at most
            ``AUTO_EXACT_MAX_BYTES`` (256 MiB), sketch otherwise. In both modes the sums and the state
            held between passes do not grow with the number of batches, and no activation or gradient
            outlives its batch; but the sketch keeps the batches themselves, as the loader gave them (their
            inputs and labels, on the loader's device), from the first pass to the last so that every pass
            sees the same ones: with ``num_batches="all"``, every batch of the training set.
        passes: sketch passes (>= 2; default 3: range, co-range, one power iteration).
        oversampling: extra sketch columns beyond k (default ``max(2k, 32)``).
        statistic: what A is taken from. ``"mean"`` (default, the paper's GiVA): the top-r right singular vectors
            of the gradient summed over the k batches. ``"second-moment"``: the top-r eigenvectors of
            ``sum_b G_b^T G_b`` over the k batch gradients ``G_b`` (``in x in`` per target in exact mode; sketched
            as ``S M`` products of ``in x l`` otherwise), the input directions the batches' gradients use most even
            where their signs cancel in the sum; for the variants whose B is seeded (``Vr``, ``VrUrand``). A batch is
            what one process's loader gives. On the MiniLM classifiers it scored below the mean (README, "Closing
            the gap to LoRA", candidate (f)).
        force: re-initialise adapters that already hold bases or trained vectors (the new bases
            replace the old under the trained vectors); without it that is a ``ValueError``.

    The gradient is taken with all adapters disabled (the pretrained model) and dropout off; train/eval
    flags and every ``requires_grad`` flag are restored, and layers with activation checkpointing keep
    it. Bases are written in place, so this can run before or after the optimizer is built.
    Same data and seed give the same bases. In a torch.distributed run every rank calls this with its
    own batches: the sums are all-reduced (k batches per rank), the QR/SVD work is split across ranks
    and the bases broadcast, so every rank gets bit-identical bases; a failure on any rank makes every
    rank raise the same :class:`DistributedInitError` (:class:`DistributedValueError`, also a ``ValueError``, when
    the cause was one, such as an argument invalid on one rank only). Data-free variants (``random``, ``weight``) need no call.
    """
    model = unwrap(peft_model)
    # Every check that needs no collective runs first, on every rank, and the ranks agree on the outcome in the
    # first collective: a rank given different arguments (or a model without the adapter) makes every rank raise
    # instead of leaving the others waiting in that collective until the process group's timeout.
    error: Optional[Exception] = None
    to_init: dict[str, GivaConfig] = {}
    targets: list[Target] = []
    try:
        _check_arguments(num_batches, mode, passes, oversampling)
        to_init = _gradient_adapters(model, adapter_name)
        targets = targets_of(model, to_init)
        check_statistic(statistic, targets)  # the name, and the variants it needs
        trained = [] if force else _already_initialised(model, to_init)
        if trained:
            raise ValueError(_already_initialised_message(trained, to_init, adapter_name))
        merged = sorted({name for layer in giva_layers(model).values() for name in layer.merged_adapters})
        if merged:  # the gradient is taken with the adapters disabled, and a disabled GiVA layer unmerges itself
            raise ValueError(f"GiVA adapter(s) {merged} are merged into the base weights; initialize takes the gradient "
                             "with the adapters off, which would unmerge them and leave them so (rounding a bf16 or "
                             "quantised weight): call model.unmerge_adapter() first, and merge again afterwards")
    except (ValueError, RuntimeError) as exc:
        error = exc
    report = InitReport(adapters=sorted(to_init), layers=len({t.layer for t in targets}), num_batches=0)
    comm = collective(next(model.parameters()).device, sharded=_sharded(model))
    comm.agree(error)  # a collective's own setup error too (TorchCollective.agree)
    _check_same_targets(comm, targets, (mode, passes, oversampling, statistic))
    if not to_init:
        logger.info("GiVA adapters %s use data-free bases; nothing to initialise", sorted(giva_configs(model)))
        return report
    _warn_half_precision_vectors(model, to_init)
    num_batches = report.num_batches = _calibration_count(comm, num_batches, dataloader)
    report.mode = choose_mode(mode, targets, statistic)
    if report.mode == "exact" and (passes != DEFAULT_PASSES or oversampling != DEFAULT_OVERSAMPLING):
        warnings.warn(  # mode='exact' given with them is refused before anything runs (_check_arguments)
            f"passes={passes!r} and oversampling={oversampling!r} set the sketch, but mode='auto' chose 'exact' (the "
            f"dense gradients fit in {AUTO_EXACT_MAX_BYTES / 2**20:.0f} MiB): they are unused; pass mode='sketch' to "
            "use them",
            stacklevel=2,
        )
    session = InitSession(targets, report.mode, passes, oversampling, statistic)
    report.passes = session.passes
    sources = _batches(dataloader, num_batches, keep=session.passes > 1)
    scale = LossScale()  # fp16: where one pass leaves the scale (and its count of clean batches) the next starts
    # training must not prefetch by the calibration's parameter order; the caller's RNG is left as it was (a
    # DataLoader without a generator of its own draws its seed from it at every pass, transformers 4's LayerDrop a
    # number at every layer in training mode: a Trainer's run after GivaInitCallback drew other dropout masks)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    rng = BatchRng(cuda) if session.passes > 1 else None  # every sketch pass draws what the first drew at each batch
    with zero3_trace_reset(peft_model), torch.random.fork_rng(devices=cuda):
        while not session.done:
            start = time.perf_counter()
            partial = run_pass(model, next(sources), session.next_request(), num_batches, loss_fn, comm, progress, scale,
                               rng)
            report.losses = report.losses or partial.losses
            report.sums_bytes = max(report.sums_bytes, partial.nbytes())
            partial = comm.sum_partial(partial, session)
            middle = time.perf_counter()
            comm.finish_pass(session, partial)
            report.gradient_seconds += middle - start
            report.svd_seconds += time.perf_counter() - middle
    write_bases(model, session)
    report.rank_deficient = dict(session.rank_deficient)
    if (message := session.rank_message()) is not None:
        warnings.warn(message, stacklevel=2)
    for name, cfg in to_init.items():
        cfg = _own_config(model, name, cfg)
        cfg.bases_info = {
            "source": "gradient",
            "variant": cfg.variant,
            "num_batches": num_batches,
            "seed": cfg.seed,
            "svd": cfg.svd if report.mode == "exact" else "sketch",
            "mode": report.mode,
            **({"passes": session.passes, "oversampling": oversampling} if report.mode == "sketch" else {}),
            **({"statistic": statistic} if statistic != "mean" else {}),  # older checkpoints: the mean
            "world_size": comm.world,
            "dtype": cfg.bases_dtype,  # A as stored (computed in fp32, rounded once if bfloat16)
            "calibration_loss": [round(x, 6) for x in report.losses],
        }
    logger.info(
        "GiVA bases (%s) for %s on %d layers: gradient %.2fs, SVD %.2fs",
        report.mode, report.adapters, report.layers, report.gradient_seconds, report.svd_seconds,
    )
    return report


def _own_config(model: nn.Module, adapter_name: str, config: GivaConfig) -> GivaConfig:
    """The config of ``adapter_name`` that ``bases_info`` is written on: ``config`` itself, or, when another adapter holds
    the same config object (TRL's ``add_adapter("ref", model.peft_config["default"])``, or a user's), a copy put in its
    place, so that one adapter's record does not land on the other's."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not any(other is config for name, other in configs.items() if name != adapter_name):
        return config
    configs[adapter_name] = own = copy.deepcopy(config)
    return own


def _warn_half_precision_vectors(model: nn.Module, configs: dict[str, GivaConfig]) -> None:
    """Warn when an adapter about to be trained keeps trainable vectors in fp16/bf16: ``lambda_s`` starts at 1, where
    bf16's step is 2**-7, so an optimizer update below 0.004 rounds away (at lr 1e-3 it never moves)."""
    half = {str(p.dtype).removeprefix("torch.") for p in half_precision_vectors(model, configs)}
    if half:
        warnings.warn(
            f"GiVA adapter(s) {sorted(configs)} keep trainable vectors in {'/'.join(sorted(half))} (get_peft_model(..., "
            "autocast_adapter_dtype=False) or a cast of the model): lambda_s starts at 1, where bf16 cannot hold an "
            "update below 0.004 and fp16 one below 0.0005, so it may never move. Train with fp32 vectors (PEFT's "
            "default); the adapter maths run in the input's dtype either way (GivaConfig.compute_dtype).",
            stacklevel=3,
        )


def check_mode(mode: Any) -> None:
    """``ValueError`` unless ``mode`` is one of ``initialize``'s modes."""
    if mode not in ("auto", "sketch", "exact"):
        raise ValueError(f"mode must be 'auto', 'sketch' or 'exact', got {mode!r}")


def _check_arguments(num_batches: Any, mode: Any, passes: Any, oversampling: Any) -> None:
    """``initialize``'s arguments, checked before anything runs (``ValueError`` naming the argument)."""
    check_num_batches(num_batches, allow_all=True)
    check_mode(mode)
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 2:
        raise ValueError(f"passes must be an int >= 2, got {passes!r}")
    if oversampling is not None and (isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0):
        raise ValueError(f"oversampling must be None or an int >= 0, got {oversampling!r}")
    if mode == "exact" and (passes != DEFAULT_PASSES or oversampling != DEFAULT_OVERSAMPLING):
        raise ValueError(
            f"passes={passes!r} and oversampling={oversampling!r} set the sketch; mode='exact' takes one pass and forms "
            "the dense gradient, so it uses neither: drop them, or use mode='sketch' (or 'auto')"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError("giva.initialize needs autograd: call it outside torch.inference_mode()")


def _gradient_adapters(model: nn.Module, adapter_name: Optional[str]) -> dict[str, GivaConfig]:
    """The GiVA adapters ``initialize`` fills: ``adapter_name``'s or all, less the data-free variants."""
    configs = giva_configs(model)
    if adapter_name is not None:
        if adapter_name not in configs:
            raise ValueError(f"no GiVA adapter named {adapter_name!r}; the model has {sorted(configs)}")
        configs = {adapter_name: configs[adapter_name]}
    if not configs:
        raise ValueError("the model has no GiVA adapter: wrap it with peft.get_peft_model(model, giva.GivaConfig(...))")
    return {name: cfg for name, cfg in configs.items() if cfg.variant in GRADIENT_VARIANTS}


def _check_same_targets(comm: Collective, targets: list[Target], settings: tuple[Any, ...] = ()) -> None:
    """Every rank must initialise the same blocks (adapters, layers, shapes, ranks, variants, seeds) the same way
    (``settings``: mode, passes, oversampling, statistic), or the sums of the later collectives would not line up: the
    ranks compare a checksum of both, and on a mismatch every rank raises (a rank whose adapters are all data-free
    takes part with no targets, then returns)."""
    if comm.world == 1:
        return
    text = "\n".join([repr(settings), *(repr(t) for t in targets)])  # Target: a frozen dataclass, every field
    checksums = comm.gather_int(zlib.crc32(text.encode()))
    if len(set(checksums)) > 1:  # every rank sees the same checksums, so every rank raises
        differ = [rank for rank, value in enumerate(checksums) if value != checksums[0]]
        raise GradientInitError(
            f"rank(s) {differ} would initialise other GiVA blocks, or with other settings, than rank 0 ({len(targets)} "
            f"blocks here; mode, passes, oversampling, statistic = {settings}): every rank must call initialize on the "
            "same model (the same GivaConfig) with the same adapter_name and arguments"
        )


def _calibration_count(comm: Collective, num_batches: NumBatches, dataloader: Iterable[Any]) -> int:
    """k as a count, the same on every rank: ``num_batches``, or ``len(dataloader)`` for ``"all"``.

    Every rank takes part in both collectives whatever it was given, so ranks that disagree (one passed "all",
    another an int; unequal loader lengths; unequal ints) all raise here instead of pairing up the per-batch
    collectives of :func:`run_pass` wrongly.
    """
    length, error = loader_length(dataloader)
    if num_batches == "all":
        count = length or 0
    else:
        count, error = int(num_batches), None
        if length == 0:  # said before any batch runs, as a too-short loader
            error = ValueError(f"num_batches={count} calibration batches were asked for, but the dataloader is empty "
                               "(len() is 0); it must give at least one batch")
        elif length is not None and length < count:  # a sized loader too short for k
            error = ValueError(
                f"num_batches={count} calibration batches were asked for, but the dataloader has {length} "
                f"(len(dataloader)); pass num_batches={length} or fewer, or num_batches='all'"
            )
    comm.agree(error)
    counts = comm.gather_int(count)
    if len(set(counts)) > 1:  # every rank sees the same counts, so every rank raises
        raise GradientInitError(
            f"the ranks would run {counts} calibration batches (rank order, num_batches={num_batches!r} here); every rank "
            "must run the same number (with num_batches='all', a DistributedSampler gives every rank the same length)"
        )
    return count


def compute_gradients(
    model: nn.Module,
    layers: dict[str, nn.Module],
    dataloader: Iterable[Any],
    num_batches: NumBatches = DEFAULT_NUM_BATCHES,
    loss_fn: Optional[LossFn] = None,
    progress: bool = True,
    scale: Optional[LossScale] = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Mean over ``num_batches`` batches of ``dL/dW`` (``out x in``, fp32) of each named GiVA layer, in this process.

    The dense gradients themselves (for tests and baselines such as LoRA-GA); adapters are disabled. ``scale``: the
    fp16 loss scale to start from, left where this call ended it; a caller that runs batch by batch (the federated
    dense statistics) gives every call the same one, as :func:`accumulate` takes it, so that its halvings and
    growth carry from call to call as within one call. Default: a fresh one.
    """
    check_num_batches(num_batches, allow_all=True)
    num_batches = _calibration_count(Collective(), num_batches, dataloader)
    items = {name: RequestItem(name, 0, layer.out_features, "dense") for name, layer in layers.items()}
    partial = run_pass(model, iter(dataloader), Request(0, 1, items), num_batches, loss_fn, Collective(), progress, scale)
    missing = [name for name in layers if name not in partial.sums]
    if missing:
        raise GradientInitError(f"GiVA layer(s) {missing[:5]} received no gradient ({NO_GRADIENT_CAUSES})")
    return {name: total.div_(partial.batches) for name, total in partial.sums.items()}, partial.losses  # own sums: in place
