"""The collectives of a distributed initialisation: agree, all-reduce the sums, split the SVDs, broadcast.

Every rank enters every collective in the same order, or every rank raises: before each
collective the ranks all-reduce a status flag (:meth:`Collective.agree`), so a failure on one rank
(a NaN loss, a layer no rank's batches reach, too few batches, an SVD error) makes every rank raise the
same :class:`DistributedInitError` at once, naming the failing rank and the cause, instead of
leaving the others blocked in an all-reduce until a timeout. A layer that only some ranks' batches
reach (an MoE expert, a multi-task head) is no failure: the other ranks add zeros in its place, and
only a layer no rank reached is an error, on every rank. Only the per-target sums of the
session are all-reduced (small sketches in ``mode="sketch"``, the dense block gradient in
``mode="exact"``); the per-target QR/SVD work is split (target ``i`` on rank ``i mod world``) and
the results are broadcast, so every rank ends with bit-identical bases.
gloo scrambles non-contiguous tensors: everything is made contiguous before a collective.

A sharded model (FSDP, DeepSpeed ZeRO-3) runs collectives inside its own forward and backward, so
a rank that raises there cannot meet the others at an agreement point: they wait in a parameter
all-gather it will never join. :meth:`TorchCollective.computing` handles that case through the
process group's key-value store instead: the failing rank writes its reason there and aborts the
process group (which wakes its gloo peers), and a watchdog thread on every rank
(:meth:`TorchCollective.watching`) aborts its own process group when it sees a failure posted (which
wakes NCCL peers). Every rank then raises the same :class:`DistributedInitError` read from the
store. The process group is unusable afterwards: the run is over anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from itertools import count
from typing import Any, ContextManager, Optional

import torch
import torch.distributed as dist

from .session import GradientInitError, InitSession, Partial

logger = logging.getLogger(__name__)

class DistributedInitError(GradientInitError):
    """Initialisation failed on one rank; every rank raises this, with the same message.

    ``reasons``: every failed rank's reason, by rank (the message names the first).
    """

    def __init__(self, rank: int, world: int, reason: str, others: list[int], reasons: Optional[dict[int, str]] = None) -> None:
        self.rank, self.world, self.reason = rank, world, reason
        self.reasons = reasons if reasons is not None else {rank: reason}
        also = f" (also failed: ranks {others})" if others else ""
        super().__init__(f"GiVA initialisation failed on rank {rank} of {world}: {reason}{also}")


class DistributedValueError(DistributedInitError, ValueError):
    """A :class:`DistributedInitError` whose cause on the failing rank was a ``ValueError`` (an invalid argument,
    a loader without ``len()``): ``except ValueError`` catches it on every rank, as it catches the cause in one
    process."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, GradientInitError) else f"{type(error).__name__}: {error}"


def collective_device(backend: str, model_device: torch.device) -> torch.device:
    """Where the collectives of a process group run: the model's device, which must be a GPU for NCCL.

    The model's device, not ``torch.cuda.current_device()``: a launcher that does not call
    ``torch.cuda.set_device`` leaves the current device at 0 on every rank while each rank's model
    sits on its own GPU.
    """
    if backend == "nccl" and model_device.type != "cuda":
        raise ValueError(
            f"the process group uses NCCL, which needs CUDA tensors, but the model's parameters are on "
            f"{model_device}: move the model to this rank's GPU (model.to(f'cuda:{{LOCAL_RANK}}')) or use gloo"
        )
    return model_device


class Collective:
    """One process: agreeing is raising, sums are already total, this process owns every target."""

    rank = 0
    world = 1

    def agree(self, error: Optional[BaseException], again: bool = False) -> bool:
        """Raise ``error`` if there is one; else whether a batch must run again (``again``: here, this process's say)."""
        if error is not None:
            raise error
        return again

    def watching(self) -> ContextManager[None]:
        """Around a pass over the batches (the sharded case's watchdog; nothing in one process)."""
        return nullcontext()

    def computing(self) -> ContextManager[None]:
        """Around a forward or backward that may run collectives of its own (nothing in one process)."""
        return nullcontext()

    def gather_int(self, value: int) -> list[int]:
        """Every rank's ``value``, in rank order."""
        return [value]

    def sum_partial(self, partial: Partial, session: InitSession) -> Partial:
        """The sums over every process's batches (here: this process's); :meth:`InitSession.check` judges them."""
        return partial

    def finish_pass(self, session: InitSession, partial: Partial) -> None:
        session.receive(partial)


def _wrong_shapes(partial: Partial, session: InitSession) -> Optional[GradientInitError]:
    """An error naming the sums whose shape is not the one every rank expects (:meth:`InitSession.sum_shape`), or
    whose key is no target of the session; never raises itself (it runs on one rank, before the agreement)."""
    expected = {key: session.sum_shape(key) if key in session.targets else "no target" for key in partial.sums}
    wrong = [f"{key}: {tuple(total.shape)}, expected {expected[key]}"
             for key, total in partial.sums.items() if tuple(total.shape) != expected[key]]
    return GradientInitError(f"sums of unexpected shape: {wrong[:5]}") if wrong else None


# Every rank creates its collectives in the same order, so the n-th one has the same store keys everywhere.
_SESSIONS = count()
# How often the watchdog looks for a failure another rank posted (seconds): one store request per rank each
# time, only while a sharded model runs its calibration batches. gloo peers do not wait for it (the failing
# rank's abort closes their connections); NCCL peers wake within this delay.
WATCHDOG_POLL_S = 0.25


class TorchCollective(Collective):
    """The default process group; collectives run on the model's ``device`` (see :func:`collective_device`).

    ``sharded``: the model runs collectives in its forward/backward (FSDP, ZeRO-3), so a failure there
    goes through the store (see the module docstring).
    """

    def __init__(self, device: torch.device, sharded: bool = False) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # A model this rank cannot run NCCL collectives from (on the CPU) is an error every rank must hear: while
        # this process sees a GPU, the agreements run there and the first one carries it (``agree``); without one
        # it cannot take part in any NCCL collective and raises here.
        self.setup_error: Optional[ValueError] = None
        try:
            self.device = collective_device(dist.get_backend(), device)
        except ValueError as exc:
            if not torch.cuda.is_available():
                raise
            self.device, self.setup_error = torch.device("cuda", torch.cuda.current_device()), exc
        self.sharded = sharded
        self.prefix = f"giva/init/{next(_SESSIONS)}"
        self._aborted = threading.Lock()
        # Kept: aborting the group unregisters it, and the store is still needed to read why.
        self.store = dist.distributed_c10d._get_default_store() if sharded else None

    def _abort(self) -> None:
        """Abort the process group once (from the failing rank or a watchdog); later calls do nothing."""
        if self._aborted.acquire(blocking=False) and dist.is_initialized():
            dist.distributed_c10d._abort_process_group()

    def _posted(self) -> Optional[DistributedInitError]:
        """The error every rank raises when some rank posted a failure to the store, else None."""
        store = self.store
        if store is None or not store.check([f"{self.prefix}/failed"]):
            return None
        failed = sorted({int(r) for r in store.get(f"{self.prefix}/failed").decode().split(",") if r})
        reasons = {r: store.get(f"{self.prefix}/reason/{r}").decode() for r in failed}
        return DistributedInitError(failed[0], self.world, reasons[failed[0]], failed[1:], reasons)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """While a sharded model runs its batches: abort this rank's process group when another rank posts a failure."""
        if not self.sharded:
            yield
            return
        stop = threading.Event()
        store = self.store

        def watch() -> None:
            while not stop.wait(WATCHDOG_POLL_S):
                if store.check([f"{self.prefix}/failed"]):
                    self._abort()
                    return

        thread = threading.Thread(target=watch, name="giva-init-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Around a sharded model's forward or backward: an exception makes every rank raise, via the store.

        An exception caused by another rank's abort (a closed connection, a destroyed group) becomes
        that rank's :class:`DistributedInitError`; any other exception is posted, then the group aborted.
        """
        if not self.sharded:
            yield
            return
        try:
            yield
        except Exception as exc:
            posted = self._posted()
            if posted is None:
                store = self.store
                store.set(f"{self.prefix}/reason/{self.rank}", _describe(exc))
                store.append(f"{self.prefix}/failed", f"{self.rank},")
                self._abort()
                posted = self._posted()
            raise posted from exc

    def agree(self, error: Optional[BaseException], again: bool = False) -> bool:
        """Every rank raises (one error naming the first failed rank) if any rank has an ``error`` or a setup error;
        else every rank returns whether any rank said ``again`` (its fp16 gradients overflowed: every rank runs the
        batch again, so that all keep entering the same collectives).

        Each rank's failure goes as bytes (a ``ValueError`` flag, then the UTF-8 reason; none without an error): the
        ranks all-reduce their lengths (and, in one more entry, the ``again`` flags), and only when one is non-zero
        all-gather the bytes, padded to the longest.
        Both run on this collective's device: ``all_gather_object`` would pickle, and under NCCL gather on
        ``torch.cuda.current_device()`` (GPU 0 on every rank when the launcher never called ``set_device``).
        """
        if error is None:
            error = self.setup_error
        payload = b"" if error is None else bytes([isinstance(error, ValueError)]) + _describe(error).encode("utf-8", "backslashreplace")
        lengths = torch.zeros(self.world + 1, dtype=torch.int64, device=self.device)
        lengths[self.rank] = len(payload)
        lengths[self.world] = int(again)
        try:
            dist.all_reduce(lengths)
        except Exception as exc:  # the group was aborted: some rank posted why
            posted = self._posted()
            if posted is None:
                raise
            raise posted from exc
        *sizes, agains = (int(n) for n in lengths.tolist())
        if not any(sizes):
            return agains > 0
        payloads = {r: data for r, data in enumerate(gather_bytes(payload, sizes, self.device)) if data}
        reasons = {r: data[1:].decode("utf-8", "replace") for r, data in payloads.items()}
        failed = sorted(payloads)
        kind = DistributedValueError if payloads[failed[0]][0] else DistributedInitError
        raise kind(failed[0], self.world, reasons[failed[0]], failed[1:], reasons) from error

    def gather_int(self, value: int) -> list[int]:
        values = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        values[self.rank] = value
        dist.all_reduce(values)
        return [int(v) for v in values.tolist()]

    def sum_partial(self, partial: Partial, session: InitSession) -> Partial:
        """All-reduce (sum) the partial's tensors and counts; every rank gets the same total.

        A target this rank's batches never reached (an MoE expert given no tokens here, a head only other ranks'
        batches use) adds zeros of the shape the session gives every rank, so the total is that of one process
        over every rank's batches. The ranks count who reached each target in the same all-reduce as the batch
        counts: a target no rank reached stays out of the total, and :meth:`InitSession.check` names it on
        every rank, as it does in one process.
        """
        keys = list(session.targets)
        self.agree(_wrong_shapes(partial, session))
        counts = torch.tensor([partial.batches, partial.tokens, *(key in partial.sums for key in keys)],
                              dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        sums = {}
        for key, reached in zip(keys, counts[2:].tolist()):
            if not reached:
                continue
            local = partial.sums.get(key)
            if local is None:
                tensor = torch.zeros(session.sum_shape(key), dtype=torch.float32, device=self.device)
            else:  # one collective per target: the dense sums of mode="exact" are not copied twice
                tensor = local.to(self.device, torch.float32).contiguous()
            dist.all_reduce(tensor)
            sums[key] = tensor
        return Partial(partial.pass_index, sums, int(counts[0]), int(counts[1]), partial.losses)

    def finish_pass(self, session: InitSession, partial: Partial) -> None:
        """Each rank computes its share of targets, all agree, then owners broadcast the results."""
        keys = list(session.targets)
        own = [key for i, key in enumerate(keys) if i % self.world == self.rank]
        error: Optional[BaseException] = None
        try:
            session.receive(partial, keys=own)
        except Exception as exc:  # an SVD or QR failure, an all-zero block: every rank must hear of it
            error = exc
        self.agree(error)
        for owner in range(self.world):
            owned = keys[owner :: self.world]
            if not owned:
                continue
            shapes = [shape for key in owned for shape in session.state_shapes(key)]
            if owner == self.rank:
                flat = torch.cat([t.to(self.device, torch.float32).reshape(-1) for key in owned for t in session.state(key)])
            else:
                flat = torch.empty(sum(_numel(s) for s in shapes), dtype=torch.float32, device=self.device)
            dist.broadcast(flat.contiguous(), src=owner)
            if owner == self.rank:
                continue
            pieces = iter(torch.split(flat, [_numel(s) for s in shapes]))
            for key in owned:
                session.set_state(key, [next(pieces).reshape(s).clone() for s in session.state_shapes(key)])


def gather_bytes(payload: bytes, sizes: list[int], device: torch.device) -> list[bytes]:
    """Every rank's ``payload``, in rank order, given every rank's length (``sizes``, already agreed on): an all-gather of
    ``uint8`` tensors on ``device``, padded to the longest. No pickling, and no object collective, which under NCCL
    runs on ``torch.cuda.current_device()`` (GPU 0 on every rank when the launcher never called ``set_device``)."""
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    if payload:
        padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [bytes(tensor[:size].cpu().tolist()) for tensor, size in zip(gathered, sizes)]


def _numel(shape: tuple[int, ...]) -> int:
    result = 1
    for size in shape:
        result *= size
    return result


def zero3_coordinators(model: Any) -> list[Any]:
    """DeepSpeed ZeRO-3's parameter coordinators driving ``model`` (a ``DeepSpeedEngine``, or the module inside one);
    [] for a model without ZeRO-3 parameters (``ds_tensor``), so nothing here touches DeepSpeed otherwise.

    An engine holds its ``DeepSpeedZeRoOffload`` as ``engine.optimizer`` (no optimizer) or
    ``engine.optimizer.parameter_offload``. A module (what the Trainer hands its callbacks) holds no reference to
    it but through the hooks the offload registered on every submodule, whose closures hold it.
    """
    inner = getattr(model, "module", model) if type(model).__name__ == "DeepSpeedEngine" else model
    if not any(hasattr(p, "ds_tensor") for p in inner.parameters()):
        return []
    if type(model).__name__ == "DeepSpeedEngine":
        optimizer = getattr(model, "optimizer", None)
        offload = getattr(optimizer, "parameter_offload", optimizer)
        if hasattr(offload, "get_param_coordinator"):
            return [offload.get_param_coordinator()]
    found: dict[int, Any] = {}
    for module in inner.modules():
        for hook in module._forward_pre_hooks.values():
            for offload in _closure_objects(hook):
                if hasattr(offload, "get_param_coordinator"):
                    found.setdefault(id(offload), offload.get_param_coordinator())
        if found:
            break
    return list(found.values())


def _closure_objects(function: Any, depth: int = 3) -> Iterator[Any]:
    """The objects a function's closure holds, and those of the functions it wraps, ``depth`` levels deep."""
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        yield value
        if depth > 1 and callable(value):
            yield from _closure_objects(value, depth - 1)


@contextmanager
def zero3_trace_reset(model: Any) -> Iterator[None]:
    """Around the calibration passes of a ZeRO-3 model: forget the parameter-fetch order they recorded.

    ZeRO-3 records the order in which its first forward and backward fetch parameters, and prefetches by it from
    then on. Calibration runs another model (eval mode, adapters off, ``autograd.grad`` to probes), so a recorded
    calibration made the first training step fail ("tracing error at step 48 ... expected ... giva_lambda_o").
    Invalidated, the trace is recorded again by the first training step, as on a fresh engine.
    """
    coordinators = zero3_coordinators(model)

    def reset() -> None:
        for coordinator in coordinators:
            invalidate = getattr(coordinator, "_invalidate_trace", None)  # DeepSpeed's private API (0.19): may move
            if invalidate is None:
                logger.warning(
                    "GiVA could not reset DeepSpeed ZeRO-3's parameter-fetch trace after calibration (this DeepSpeed "
                    "has no %s._invalidate_trace); if the first training step fails with a tracing error, call "
                    "giva.initialize before deepspeed.initialize", type(coordinator).__name__)
                continue
            is_invalid = getattr(coordinator, "is_invalid_trace", None)
            if is_invalid is None or not is_invalid():
                invalidate()

    try:
        yield
    except BaseException:
        with suppress(Exception):  # the process group may be aborted: the original error is what matters
            reset()
        raise
    reset()


def collective(device: torch.device, sharded: bool = False) -> Collective:
    """The collective of the current run: torch.distributed's when initialised with > 1 rank."""
    return TorchCollective(device, sharded) if is_distributed() else Collective()
