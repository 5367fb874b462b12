"""One pass over calibration batches: capture ``(x, dL/dy)`` and add what a request asks for into sums."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..precision import autocast_off
from . import exact, sketch
from .capture import Capture, LossFn, adapters_disabled, calibration_mode, giva_layers, to_device, unwrap
from .distributed import Collective, DistributedInitError
from .session import GradientInitError, Partial, Request, RequestItem

# fp16 output gradients are taken from a scaled loss, as AMP's GradScaler does: with a realistic vocabulary
# dL/dlogits = (p - y) / T is ~1e-8, below fp16's smallest subnormal (6e-8), and rounded to zero unscaled (the
# smallest principal cosine to fp32's bases was 0.46 on a 32k-vocabulary Llama at 2048 tokens). The backward
# starts from LOSS_SCALE instead of 1; a batch whose fp16 gradients overflow is run again at half the scale, down
# to 1 (an unscaled backward), after which a non-finite gradient is the usual error; after GROWTH_INTERVAL batches
# in a row without an overflow the scale doubles again, up to where it started. bf16 holds fp32's range and fp32
# needs nothing: both run unscaled, as before.
LOSS_SCALE = 2.0**16
FP16_LOSS_SCALE = 2.0**15  # a backward seeded at an fp16 loss: 2**16 is beyond fp16's largest finite number
# GROWTH_INTERVAL trades forwards for precision. GradScaler's 2000 suits training, where an overflow skips an
# optimizer step; here it costs one more forward and backward of the batch, while a scale left low costs every later
# batch its small gradients (scaled below fp16's subnormals: their sums 60 % off fp32's on a tiny Llama whose scale
# stayed 2**9 too low, tests/test_init_precision.py). A model that overflows at twice its settled scale pays one
# extra attempt per GROWTH_INTERVAL batches (at most 25 % more at 4; a tiny fp16 Llama whose loss x 2**12 settles
# at 2**7 ran 86 forwards for 64 batches, 74 without growth, 79 at 8, 103 at 2); a scale halved k times by one
# batch is back after k * GROWTH_INTERVAL batches (36 for 2**16 -> 2**7; 72 at 8, more than most calibrations run).
GROWTH_INTERVAL = 4


@dataclass
class LossScale:
    """The fp16 loss scale, kept from batch to batch and from pass to pass, as GradScaler keeps it.

    A batch whose fp16 gradients overflow (on any rank) runs again at half the scale, down to 1; after
    ``GROWTH_INTERVAL`` batches in a row that ran without an overflow on any rank (:attr:`clean` counts them, a
    batch's clean re-run included) the scale doubles, up to :attr:`limit`, its start value; an overflow resets the
    count. Every rank starts at the same value and updates it from the same all-reduced overflow flag, so value and
    count stay equal on every rank. bf16 and fp32 backwards are not scaled and never overflow it.
    """

    value: float = LOSS_SCALE
    limit: float = LOSS_SCALE  # the largest value growth returns to: LOSS_SCALE, or FP16_LOSS_SCALE for an fp16 loss
    clean: int = 0  # batches in a row since the last overflow

    def cap(self, limit: float) -> None:
        """Lower the start value (and the value) to at most ``limit``, for good."""
        self.limit = min(self.limit, limit)
        self.value = min(self.value, self.limit)

    def update(self, overflowed: bool) -> None:
        """After an attempt at a batch, from the overflow flag every rank agreed on."""
        if overflowed:
            self.value = max(self.value / 2, 1.0)
            self.clean = 0
            return
        self.clean += 1
        if self.clean >= GROWTH_INTERVAL:
            self.value = min(self.value * 2, self.limit)
            self.clean = 0


class _Sums:
    """The sink: for each hooked layer's ``(x, g)``, the products each request item asks for.

    A batch may run more than once (an fp16 gradient that overflowed at the loss scale, on this rank or another):
    each call of a layer within a batch adds its product to the sums once, in the first attempt where its input and
    output gradient were finite. ``g`` arrives multiplied by :attr:`scale`; its fp32 copy is divided by it, so that
    sums of batches run at other scales add up.
    """

    def __init__(self, request: Request) -> None:
        self.items: dict[str, list[tuple[str, RequestItem]]] = {}
        for key, item in request.items.items():
            self.items.setdefault(item.layer, []).append((key, item))
        self.first_layer = next(iter(self.items))
        self.order = {layer: i for i, layer in enumerate(self.items)}  # the request's (the model's) order
        self.matrices: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        # The second moment needs each batch's whole gradient G_b before squaring it: a layer that runs twice in a
        # batch (shared weights) would give sum_calls G_c^T G_c, without the cross terms. Such layers are refused.
        self.squared = {item.layer for item in request.items.values() if item.kind in ("gram", "gram_m")}
        self.repeated: Optional[str] = None
        # This attempt at a batch: its loss scale (1: unscaled; above 1 it may run again on an fp16 overflow, the
        # overflowing calls' products then staying out of the sums), the calls of each layer so far, and per call
        # (layer, n-th call) whose product was taken, whether its x and g were finite: 2-element bool tensors on
        # the first call's device, read once after the backward (one host sync per attempt, none per layer).
        self.fp16 = False  # a hooked output of this attempt's forward was fp16: its backward is loss-scaled
        self.scale = 1.0
        self.attempt = 0  # 0: the batch's first
        self.calls: dict[str, int] = {}
        self.taken: list[tuple[str, int]] = []
        self.flags: list[torch.Tensor] = []
        self.device: Optional[torch.device] = None
        self.done: set[tuple[str, int]] = set()  # calls whose product is in the sums, this batch

    def __call__(self, layer: str, x: torch.Tensor, g: torch.Tensor) -> None:
        call = self.calls[layer] = self.calls.get(layer, 0) + 1
        if layer == self.first_layer and self.attempt == 0:
            self.tokens += x.shape[0]
        if layer in self.squared and call > 1:
            self.repeated = self.repeated or layer
            return
        if (layer, call) in self.done:  # added in an earlier attempt at this batch
            return
        # Under the caller's autocast (this thread's, or CUDA's autograd thread's) the fp32 products below would run
        # in bf16/fp16: the first batch's sum in bf16, and every later addmm_ into it an error.
        with autocast_off(x.device):
            self._add(layer, call, x, g)

    def _add(self, layer: str, call: int, x: torch.Tensor, g: torch.Tensor) -> None:
        finite = torch.stack((torch.isfinite(x).all(), torch.isfinite(g).all()))
        self.device = self.device or finite.device
        self.taken.append((layer, call))
        self.flags.append(finite.to(self.device))
        if self.scale != 1.0:
            # An fp32 copy of g (never g itself: autograd passes it on), zero if it overflowed, the scale divided out.
            g = g.to(torch.float32, copy=True).masked_fill_(~finite[1], 0.0).div_(self.scale)
        for key, item in self.items.get(layer, ()):
            rows = g[:, item.out_start : item.out_start + item.out_size]
            total = self.sums.get(key)
            if item.kind in ("dense", "gram"):
                dense = exact.accumulate_dense if item.kind == "dense" else exact.accumulate_gram
                self.sums[key] = dense(total, x, rows)
                continue
            if key not in self.matrices:
                self.matrices[key] = item.matrix.to(x.device, torch.float32)
            accumulate = {"gt": sketch.accumulate_gt, "g": sketch.accumulate_g, "gram_m": sketch.accumulate_gram}[item.kind]
            self.sums[key] = accumulate(total, x, rows, self.matrices[key])

    def attempt_error(self, batch_index: int) -> tuple[Optional[GradientInitError], bool]:
        """After an attempt's backward: ``(error, again)``. The error names a layer the second moment cannot square
        (it ran more than once in the batch), or the first layer whose input or output gradient was NaN/inf (one
        sync); ``again``, without an error, says that an fp16 gradient overflowed at a loss scale above 1 and the
        batch must run again at a smaller one."""
        repeated, self.repeated = self.repeated, None
        taken, self.taken, self.calls = self.taken, [], {}
        flags, self.flags = self.flags, []
        if repeated is not None:
            return GradientInitError(
                f"GiVA layer {repeated!r} ran more than once in calibration batch {batch_index} (shared weights?): "
                "statistic='second-moment' needs each batch's whole gradient of a layer; use statistic='mean'"
            ), False
        finite = torch.stack(flags).tolist() if flags else []
        self.done.update(key for key, (x_ok, g_ok) in zip(taken, finite) if x_ok and g_ok)
        # A non-finite input is the forward's: no loss scale changes it. The error names the first such layer in the
        # request's (the model's) order, not the backward's.
        inputs = {layer for (layer, _), (x_ok, _) in zip(taken, finite) if not x_ok}
        gradients = {layer for (layer, _), (_, g_ok) in zip(taken, finite) if not g_ok}
        if not inputs and not gradients:
            return None, False
        if not inputs and self.scale > 1:
            return None, True
        broken = min(inputs or gradients, key=self.order.__getitem__)
        scaled = " (fp16, with the loss scale halved down to 1)" if self.fp16 and not inputs else ""
        return GradientInitError(
            f"GiVA layer {broken!r} received a non-finite (NaN/inf) gradient in calibration batch {batch_index} "
            f"although the loss was finite{scaled}; check the model's dtype and that batch's inputs"
        ), False

    def next_batch(self) -> None:
        self.attempt = 0
        self.done.clear()


class BatchRng:
    """torch's RNG state (CPU and the given CUDA devices) at each calibration batch of the first pass, set again at the
    same batch of every later pass. A loss that draws random numbers (a diffusion loss's noise and timesteps, masking
    inside ``loss_fn``, dropout left on in training mode) then gives the same gradient in every sketch pass, as the
    power iteration needs: with the draws running on from pass to pass, the sketch mixed the subspaces of different
    gradients."""

    def __init__(self, cuda_devices: list[int]) -> None:
        self.devices = cuda_devices
        self.states: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def at_batch(self, pass_index: int, index: int) -> None:
        if pass_index == 0:
            self.states.append((torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices]))
            return
        cpu, cuda = self.states[index]
        torch.set_rng_state(cpu)
        for device, state in zip(self.devices, cuda):
            torch.cuda.set_rng_state(state, device)


def run_pass(
    model: nn.Module,
    batches: Iterator[Any],
    request: Request,
    num_batches: Optional[int],
    loss_fn: Optional[LossFn],
    comm: Collective,
    progress: bool = False,
    scale: Optional[LossScale] = None,
    rng: Optional[BatchRng] = None,
) -> Partial:
    """Sums over the next ``num_batches`` batches (all of them if None) of what ``request`` asks for.

    ``scale``: the fp16 loss scale to start from, left where the pass ended it (the passes of one session share one);
    default a fresh one. ``rng``: where each batch's random draws start (:class:`BatchRng`), for passes over kept
    batches.

    Ranks agree after fetching each batch (a loader that ran out or raised), after its forward and after its
    backward, so that all stop together; see :mod:`giva.init.distributed` for failures inside a sharded model.
    """
    model = unwrap(model)
    layers = giva_layers(model)
    sums = _Sums(request)
    unknown = sorted(set(sums.items) - set(layers))
    if unknown:
        raise ValueError(f"the request names layers the model does not have as GiVA layers: {unknown[:5]}")
    device = next(model.parameters()).device
    capture = Capture({name: layers[name] for name in sums.items}, sums)
    losses: list[float] = []
    scale = LossScale() if scale is None else scale  # for fp16 output gradients only
    desc = f"GiVA pass {request.pass_index + 1}/{request.passes}"
    bar = tqdm(total=num_batches, desc=desc, disable=not progress)
    with adapters_disabled(model), calibration_mode(model), capture.attached(), comm.watching(), bar:
        for index in count() if num_batches is None else range(num_batches):
            error: Optional[BaseException] = None
            try:
                batch = to_device(next(batches), device)
            except StopIteration:
                if num_batches is None:
                    break
                error = GradientInitError(f"the dataloader gave {index} batches but num_batches={num_batches} were asked for")
            except Exception as exc:  # noqa: BLE001  a broken loader: every rank must hear of it
                error = exc  # one process: the loader's own exception, as it was
                if comm.world > 1:
                    error = GradientInitError(f"the dataloader raised {type(exc).__name__} for calibration batch {index}: {exc}")
                    error.__cause__ = exc
            comm.agree(error)
            sums.next_batch()
            if rng is not None:
                rng.at_batch(request.pass_index, index)
            # Three agreement points per attempt at a batch (after the loader, the forward and the backward): no
            # rank starts a backward, whose collectives a sharded model needs every rank to join, after another
            # rank's forward failed. A failure inside a sharded forward/backward goes through comm.computing. The
            # last agreement also carries whether any rank's fp16 gradients overflowed: then every rank runs the
            # batch again (a rank whose products are all in its sums adds nothing), so that the ranks keep
            # entering the same collectives, those of a sharded model's forward and backward included.
            while True:
                try:
                    with comm.computing():
                        loss = capture.forward(model, batch, loss_fn)
                    value = capture.check_loss(loss, index)  # outside: a NaN loss is agreed on, the group stays usable
                except DistributedInitError:  # already agreed through the store
                    raise
                except Exception as exc:  # noqa: BLE001  every rank must hear of it before the next collective
                    error = exc
                comm.agree(error)
                sums.fp16 = capture.fp16_outputs()
                if sums.fp16 and loss.dtype == torch.float16:
                    scale.cap(FP16_LOSS_SCALE)
                sums.scale = scale.value if sums.fp16 else 1.0
                again = False
                try:
                    with comm.computing():
                        capture.backward(loss, sums.scale)
                    error, again = sums.attempt_error(index)
                except DistributedInitError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    error = exc
                del loss
                # Every rank updates the scale from the agreed flag: value and count stay equal on all of them.
                again = comm.agree(error, again)
                scale.update(overflowed=again)  # kept for the later batches and passes
                if not again:
                    break
                sums.attempt += 1
            losses.append(value)
            bar.update()
    return Partial(request.pass_index, sums.sums, batches=len(losses), tokens=sums.tokens, losses=losses)


def accumulate(
    model: nn.Module,
    batches: Iterable[Any],
    request: Request,
    num_batches: Optional[int] = None,
    loss_fn: Optional[LossFn] = None,
    progress: bool = False,
    scale: Optional[LossScale] = None,
) -> Partial:
    """This process's sums for one pass of a session (e.g. on a federated client).

    Runs the first ``num_batches`` batches (default: all) through ``model`` with its GiVA adapters
    disabled, in calibration mode (no dropout), and returns what ``request`` asks for summed over
    them, with the batch and token counts; partials of several processes add up (``a + b``).
    Flags and modes of the model are restored. ``request`` comes from :meth:`InitSession.next_request`.
    ``scale``: the fp16 loss scale to start from, left where the pass ended it; give every pass of a session the
    same one, as :func:`giva.init.initialize` does, so that a later pass starts where the one before left it instead
    of halving it down from ``LOSS_SCALE`` again. Default: a fresh one (``LOSS_SCALE``).
    """
    if num_batches is not None:
        check_num_batches(num_batches)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("GiVA initialisation needs autograd: run it outside torch.inference_mode()")
    return run_pass(model, iter(batches), request, num_batches, loss_fn, Collective(), progress, scale)


def check_num_batches(num_batches: Any, allow_all: bool = False) -> None:
    """``num_batches`` is a positive int, or (where ``allow_all``) ``"all"``: every batch of the dataloader."""
    if allow_all and num_batches == "all":
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        also = " or 'all' (every batch of the dataloader)" if allow_all else ""
        raise ValueError(f"num_batches must be a positive int (the number of calibration batches k){also}, got {num_batches!r}")


def loader_length(dataloader: Any) -> tuple[Optional[int], Optional[ValueError]]:
    """``len(dataloader)``, or None for a loader without one (an iterable-style loader, whose batches are checked as
    they come), and the error ``num_batches="all"`` raises on that loader: it has no len(), or is empty."""
    try:
        n = len(dataloader)
    except Exception:  # TypeError: no __len__; a loader's own (NotImplementedError) alike, on every rank, not before agree
        return None, ValueError(
            f"num_batches='all' averages every batch of the dataloader, but {type(dataloader).__name__} has no len() "
            "(an iterable-style loader); pass the number of calibration batches as an int"
        )
    if n < 1:
        return n, ValueError("num_batches='all': the dataloader is empty (len() is 0); it must give at least one batch")
    return n, None
