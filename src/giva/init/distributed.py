"""The collectives of a distributed initialisation: agree, all-reduce the sums, split the SVDs, broadcast.

Every rank enters every collective in the same order, or every rank raises: before each
collective the ranks all-reduce a status flag (:meth:`Collective.agree`), so a failure on one rank
(a NaN loss, a layer without gradient, too few batches, an SVD error) makes every rank raise the
same :class:`DistributedInitError` at once, naming the failing rank and the cause, instead of
leaving the others blocked in an all-reduce until a timeout. Only the per-target sums of the
session are all-reduced (small sketches in ``mode="sketch"``, the dense block gradient in
``mode="exact"``); the per-target QR/SVD work is split (target ``i`` on rank ``i mod world``) and
the results are broadcast, so every rank ends with bit-identical bases.
gloo scrambles non-contiguous tensors: everything is made contiguous before a collective.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .session import GradientInitError, InitSession, Partial


class DistributedInitError(GradientInitError):
    """Initialisation failed on one rank; every rank raises this, with the same message."""

    def __init__(self, rank: int, world: int, reason: str, others: list[int]) -> None:
        self.rank, self.world, self.reason = rank, world, reason
        also = f" (also failed: ranks {others})" if others else ""
        super().__init__(f"GiVA initialisation failed on rank {rank} of {world}: {reason}{also}")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, GradientInitError) else f"{type(error).__name__}: {error}"


class Collective:
    """One process: agreeing is raising, sums are already total, this process owns every target."""

    rank = 0
    world = 1

    def agree(self, error: Optional[BaseException]) -> None:
        if error is not None:
            raise error

    def sum_partial(self, partial: Partial, keys: list[str]) -> Partial:
        self.agree(_missing_keys(partial, keys))
        return partial

    def finish_pass(self, session: InitSession, partial: Partial) -> None:
        session.receive(partial)


def _missing_keys(partial: Partial, keys: list[str]) -> Optional[GradientInitError]:
    missing = sorted({key.split(":", 1)[1].rsplit("#", 1)[0] for key in keys if key not in partial.sums})
    if not missing:
        return None
    return GradientInitError(
        f"GiVA layer(s) {missing[:5]} received no gradient (not on the path from inputs to loss); "
        "remove them from target_modules"
    )


class TorchCollective(Collective):
    """The default process group; collectives run on ``device`` (CUDA for NCCL, CPU for gloo)."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else device

    def agree(self, error: Optional[BaseException]) -> None:
        flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(error is not None)
        dist.all_reduce(flags)
        if not bool(flags.any()):
            return
        reasons: list[Optional[str]] = [None] * self.world
        dist.all_gather_object(reasons, None if error is None else _describe(error))
        failed = [r for r in range(self.world) if flags[r]]
        raise DistributedInitError(failed[0], self.world, str(reasons[failed[0]]), failed[1:]) from error

    def sum_partial(self, partial: Partial, keys: list[str]) -> Partial:
        """All-reduce (sum) the partial's tensors and counts; every rank gets the same total."""
        self.agree(_missing_keys(partial, keys))
        counts = torch.tensor([partial.batches, partial.tokens], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts)
        sums = {}
        for key in keys:  # one collective per target: the dense sums of mode="exact" are not copied twice
            tensor = partial.sums[key].to(self.device).contiguous()
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


def _numel(shape: tuple[int, ...]) -> int:
    result = 1
    for size in shape:
        result *= size
    return result


def collective(device: torch.device) -> Collective:
    """The collective of the current run: torch.distributed's when initialised with > 1 rank."""
    return TorchCollective(device) if is_distributed() else Collective()
