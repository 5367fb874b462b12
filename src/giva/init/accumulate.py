"""One pass over calibration batches: capture ``(x, dL/dy)`` and add what a request asks for into sums."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import count
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import exact, sketch
from .capture import Capture, LossFn, adapters_disabled, calibration_mode, giva_layers, to_device, unwrap
from .distributed import Collective, DistributedInitError
from .session import GradientInitError, Partial, Request, RequestItem


class _Sums:
    """The sink: for each hooked layer's ``(x, g)``, the products each request item asks for."""

    def __init__(self, request: Request) -> None:
        self.items: dict[str, list[tuple[str, RequestItem]]] = {}
        for key, item in request.items.items():
            self.items.setdefault(item.layer, []).append((key, item))
        self.first_layer = next(iter(self.items))
        self.matrices: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        # Per layer: were its x and dL/dy finite? O(tokens * (in + out)), far cheaper than checking the sums.
        # One preallocated flag vector, updated in place, without a host sync: no small tensor kept per layer
        # per batch. (The exact path's extra 1.1 GB of peak RSS on a 0.5B Llama came from the per-batch
        # out x in products that glibc kept as heap free space; exact.accumulate_dense no longer forms them.)
        self.layer_index = {layer: i for i, layer in enumerate(self.items)}
        self.finite: Optional[torch.Tensor] = None
        self.tokens = 0
        # The second moment needs each batch's whole gradient G_b before squaring it: a layer that runs twice in a
        # batch (shared weights) would give sum_calls G_c^T G_c, without the cross terms. Such layers are refused.
        self.squared = {item.layer for item in request.items.values() if item.kind in ("gram", "gram_m")}
        self.seen: set[str] = set()
        self.repeated: Optional[str] = None

    def __call__(self, layer: str, x: torch.Tensor, g: torch.Tensor) -> None:
        if layer == self.first_layer:
            self.tokens += x.shape[0]
        if layer in self.squared:
            if layer in self.seen:
                self.repeated = self.repeated or layer
                return
            self.seen.add(layer)
        if self.finite is None:
            self.finite = torch.ones(len(self.layer_index), dtype=torch.bool, device=x.device)
        index = self.layer_index[layer]
        self.finite[index] &= torch.isfinite(g).all() & torch.isfinite(x).all()
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

    def batch_error(self, batch_index: int) -> Optional[GradientInitError]:
        """After a batch's backward: an error naming a layer the second moment cannot square (it ran more than once
        in the batch), or the first layer whose input or output gradient was NaN/inf (one sync); None if neither."""
        repeated, self.repeated = self.repeated, None
        self.seen.clear()
        if repeated is not None:
            return GradientInitError(
                f"GiVA layer {repeated!r} ran more than once in calibration batch {batch_index} (shared weights?): "
                "statistic='second-moment' needs each batch's whole gradient of a layer; use statistic='mean'"
            )
        if self.finite is None or bool(self.finite.all()):
            return None
        layer = next(name for name, i in self.layer_index.items() if not self.finite[i])
        return GradientInitError(
            f"GiVA layer {layer!r} received a non-finite (NaN/inf) gradient in calibration batch {batch_index} "
            "although the loss was finite; check the model's dtype and that batch's inputs"
        )


def run_pass(
    model: nn.Module,
    batches: Iterator[Any],
    request: Request,
    num_batches: Optional[int],
    loss_fn: Optional[LossFn],
    comm: Collective,
    progress: bool = False,
) -> Partial:
    """Sums over the next ``num_batches`` batches (all of them if None) of what ``request`` asks for.

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
            # Three agreement points per batch (after the loader, the forward and the backward): no rank
            # starts a backward, whose collectives a sharded model needs every rank to join, after another
            # rank's forward failed. A failure inside a sharded forward/backward goes through comm.computing.
            try:
                with comm.computing():
                    loss = capture.forward(model, batch, loss_fn)
                value = capture.check_loss(loss, index)  # outside: a NaN loss is agreed on, the group stays usable
            except DistributedInitError:  # already agreed through the store
                raise
            except Exception as exc:  # noqa: BLE001  every rank must hear of it before the next collective
                error = exc
            comm.agree(error)
            try:
                with comm.computing():
                    capture.backward(loss)
                error = sums.batch_error(index)
            except DistributedInitError:
                raise
            except Exception as exc:  # noqa: BLE001
                error = exc
            comm.agree(error)
            losses.append(value)
            del loss
            bar.update()
    return Partial(request.pass_index, sums.sums, batches=len(losses), tokens=sums.tokens, losses=losses)


def accumulate(
    model: nn.Module,
    batches: Iterable[Any],
    request: Request,
    num_batches: Optional[int] = None,
    loss_fn: Optional[LossFn] = None,
    progress: bool = False,
) -> Partial:
    """This process's sums for one pass of a session (e.g. on a federated client).

    Runs the first ``num_batches`` batches (default: all) through ``model`` with its GiVA adapters
    disabled, in calibration mode (no dropout), and returns what ``request`` asks for summed over
    them, with the batch and token counts; partials of several processes add up (``a + b``).
    Flags and modes of the model are restored. ``request`` comes from :meth:`InitSession.next_request`.
    """
    if num_batches is not None:
        check_num_batches(num_batches)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("GiVA initialisation needs autograd: run it outside torch.inference_mode()")
    return run_pass(model, iter(batches), request, num_batches, loss_fn, Collective(), progress)


def check_num_batches(num_batches: Any, allow_all: bool = False) -> None:
    """``num_batches`` is a positive int, or (where ``allow_all``) ``"all"``: every batch of the dataloader."""
    if allow_all and num_batches == "all":
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        also = " or 'all' (every batch of the dataloader)" if allow_all else ""
        raise ValueError(f"num_batches must be a positive int (the number of calibration batches k){also}, got {num_batches!r}")


def loader_length(dataloader: Any) -> tuple[int, Optional[ValueError]]:
    """The number of batches ``num_batches="all"`` stands for: ``len(dataloader)``, or the error saying why it has none."""
    try:
        n = len(dataloader)
    except TypeError:
        return 0, ValueError(
            f"num_batches='all' averages every batch of the dataloader, but {type(dataloader).__name__} has no len() "
            "(an iterable-style loader); pass the number of calibration batches as an int"
        )
    if n < 1:
        return 0, ValueError("num_batches='all': the dataloader is empty (len() is 0); it must give at least one batch")
    return n, None
