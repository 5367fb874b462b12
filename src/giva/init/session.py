"""The pass-based initialisation protocol: what to accumulate, and how sums become bases.

An :class:`InitSession` holds no model: it knows the targets (one per adapted block of a layer),
asks for one pass over the calibration batches at a time (:meth:`InitSession.next_request`), takes
the summed result (:meth:`InitSession.receive`) and, after the last pass, gives the bases. The
sums in a :class:`Partial` add up across processes, so one process, the ranks of a
``torch.distributed`` run (all-reduce) and federated clients (a server adds their partials) all
drive the same session::

    session = InitSession(targets, mode="sketch", passes=3)
    while not session.done:
        request = session.next_request()              # small test matrices, the same everywhere
        partial = accumulate(model, batches, request)  # sums over this process's batches
        session.receive(partial)                       # or the sum of several processes' partials
    bases = session.bases()                            # {target key: (A r x in, B out x r)}

``mode="exact"`` asks for the dense block gradient in one pass (``out x in`` per target);
``mode="sketch"`` for ``G^T M`` / ``G M`` products of ``in x l`` / ``out x l`` (see ``sketch.py``).
``statistic="second-moment"`` replaces the summed gradient ``G = sum_b G_b`` by the second moment of the
batch gradients ``S = sum_b G_b^T G_b`` (``in x in``; sketched as ``S M``), whose top eigenvectors give A.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

import torch

from ..bases import (
    GRADIENT_VARIANTS,
    SEEDED_B_VARIANTS,
    bases_from_input_vectors,
    bases_from_singular_vectors,
    gradient_bases,
    layer_generator,
    max_rank,
    numerical_rank,
    top_eigenpairs,
)
from ..precision import autocast_off
from . import sketch

# Why a layer can receive no gradient besides being off the loss's path (named in GradientInitError).
REENTRANT_CAUSE = (
    "reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True: use use_reentrant=False, e.g. "
    "gradient_checkpointing_kwargs={'use_reentrant': False})"
)
NO_GRADIENT_CAUSES = "not on the path from inputs to loss, or run only with autograd off, as under " + REENTRANT_CAUSE

Mode = Literal["exact", "sketch"]
Kind = Literal["dense", "gt", "g", "gram", "gram_m"]
# What the input basis A is taken from: "mean", the top right singular vectors of the gradient summed over the
# calibration batches (the paper's GiVA); "second-moment", the top eigenvectors of sum_b G_b^T G_b over the batch
# gradients G_b, the input directions each batch's gradient uses most even where their signs cancel in the sum.
Statistic = Literal["mean", "second-moment"]
STATISTICS: tuple[str, ...] = ("mean", "second-moment")


class GradientInitError(RuntimeError):
    """The calibration pass could not produce usable gradients (no loss, NaN loss, a layer off the loss path)."""


def check_gradient_sum(total: torch.Tensor, layer: str, block: int) -> None:
    """Raise :class:`GradientInitError` naming the layer and block if a summed gradient statistic is non-finite or
    all zero (a layer the calibration loss does not depend on: its SVD would give arbitrary bases)."""
    # One reduction, no temporary the size of the sums (a dense exact-mode sum is out x in): min and max are NaN if
    # any entry is, +-inf if any entry is, both 0 only if every entry is 0, and never overflow. (Tensor.any on
    # floats takes several times longer on CPU.)
    low, high = torch.aminmax(total)
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise GradientInitError(f"GiVA layer {layer!r} (block {block}) has a non-finite gradient sum")
    if low == 0 and high == 0:
        raise GradientInitError(
            f"GiVA layer {layer!r} (block {block}) received an all-zero gradient; "
            "it does not affect the loss on the calibration data"
        )


def rank_message(deficient: dict[tuple[str, int], tuple[int, int]]) -> Optional[str]:
    """A warning naming the blocks ``{(layer, block): (found, needed)}`` whose calibration statistic has fewer
    non-zero singular values than their bases need (None if there are none)."""
    if not deficient:
        return None
    named = [f"{layer!r} (block {block}: {found} of {needed})" for (layer, block), (found, needed) in deficient.items()]
    more = f" and {len(named) - 5} more" if len(named) > 5 else ""
    return (
        f"GiVA layer(s) {', '.join(named[:5])}{more}: the calibration statistic has fewer non-zero singular values "
        "than the bases need, so their directions past those are arbitrary ones the loss did not reach. A gradient "
        "summed over T tokens has rank at most T (a layer the loss reaches through one token per sequence, as a "
        "classifier's first token, at most the number of sequences): calibrate on more data (num_batches, batch "
        "size) or use a smaller r"
    )


@dataclass(frozen=True)
class Target:
    """One block of output rows of one layer whose bases one adapter needs.

    ``key`` (``"adapter:layer#block"``) names it in requests, partials and results.
    """

    adapter: str
    layer: str
    block: int
    out_start: int
    out_size: int
    in_features: int
    rank: int
    variant: str
    seed: int
    svd: str = "auto"  # the exact mode's SVD method (GivaConfig.svd)

    def __post_init__(self) -> None:
        if self.variant not in GRADIENT_VARIANTS:
            raise ValueError(f"target {self.key}: variant must be one of {GRADIENT_VARIANTS}, got {self.variant!r}")
        if not 1 <= self.rank <= max_rank(self.variant, self.out_size, self.in_features):
            raise ValueError(f"target {self.key}: rank {self.rank} does not fit a {self.out_size} x {self.in_features} block")

    @property
    def key(self) -> str:
        return f"{self.adapter}:{self.layer}#{self.block}"

    @property
    def singular_vectors(self) -> int:
        """How many singular pairs the variant needs (2r for VrU2r)."""
        return 2 * self.rank if self.variant == "VrU2r" else self.rank


@dataclass(frozen=True)
class RequestItem:
    """Accumulate, over the batches, for rows ``out_start:out_start+out_size`` of ``layer``'s gradient G:
    ``dense``: G (``out x in``); ``gt``: G^T M (M ``out x l``); ``g``: G M (M ``in x l``); with ``G_b`` one batch's
    gradient, ``gram``: sum_b G_b^T G_b (``in x in``); ``gram_m``: sum_b G_b^T G_b M (M ``in x l``)."""

    layer: str
    out_start: int
    out_size: int
    kind: Kind
    matrix: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Request:
    """One pass over the calibration batches: an item per target key."""

    pass_index: int  # 0-based
    passes: int
    items: dict[str, RequestItem]


@dataclass
class Partial:
    """Sums over some batches for one pass; partials of the same pass add up (``a + b``)."""

    pass_index: int
    sums: dict[str, torch.Tensor]
    batches: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)

    def __add__(self, other: "Partial") -> "Partial":
        if other.pass_index != self.pass_index or set(other.sums) != set(self.sums):
            raise ValueError(
                f"cannot add partials of passes {self.pass_index} and {other.pass_index} or of different targets"
            )
        return Partial(
            self.pass_index,
            {key: self.sums[key] + other.sums[key].to(self.sums[key].device) for key in self.sums},
            self.batches + other.batches,
            self.tokens + other.tokens,
            self.losses + other.losses,
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())


def check_statistic(statistic: object, targets: Iterable[Target]) -> None:
    """``ValueError`` unless ``statistic`` is known and, for ``"second-moment"``, every target's B is seeded."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if statistic == "second-moment":
        wrong = sorted({t.variant for t in targets} - set(SEEDED_B_VARIANTS))
        if wrong:
            raise ValueError(
                f"statistic='second-moment' gives A only (input directions); variant(s) {wrong} take B from the "
                f"gradient's left singular vectors: use statistic='mean' or a variant in {SEEDED_B_VARIANTS}"
            )


class InitSession:
    """Drives the passes for a set of targets; holds only small per-target state (no model, no rank).

    Args:
        targets: the blocks to initialise (keys must be unique).
        mode: ``"exact"`` (one pass, dense ``out x in`` sums) or ``"sketch"`` (``passes`` passes,
            ``(in + out) * l`` numbers per target).
        passes: sketch passes, >= 2 (2: range + co-range; each extra pass is one power iteration).
        oversampling: extra sketch columns beyond the k singular vectors; None: ``max(2k, 32)``.
        statistic: ``"mean"`` (A from the summed gradient) or ``"second-moment"`` (A from ``sum_b G_b^T G_b``;
            only for variants whose B is seeded, ``Vr`` and ``VrUrand``).

    Same targets and seeds give the same requests and, for the same sums, the same bases, in any process.
    """

    def __init__(
        self,
        targets: Iterable[Target],
        mode: Mode = "sketch",
        passes: int = sketch.DEFAULT_PASSES,
        oversampling: Optional[int] = sketch.DEFAULT_OVERSAMPLING,
        statistic: Statistic = "mean",
    ) -> None:
        self.targets: dict[str, Target] = {}
        for target in targets:
            if target.key in self.targets:
                raise ValueError(f"duplicate target {target.key}")
            self.targets[target.key] = target
        if not self.targets:
            raise ValueError("an InitSession needs at least one target")
        if mode not in ("exact", "sketch"):
            raise ValueError(f"mode must be 'exact' or 'sketch', got {mode!r}")
        if mode == "sketch" and (isinstance(passes, bool) or not isinstance(passes, int) or passes < 2):
            raise ValueError(f"passes must be an int >= 2 for mode='sketch', got {passes!r}")
        check_statistic(statistic, self.targets.values())
        self.mode: Mode = mode
        self.statistic: Statistic = statistic
        self.passes = 1 if mode == "exact" else passes
        self.oversampling = oversampling
        self.pass_index = 0
        self.batches = 0
        # Targets this process computed whose statistic has fewer non-zero singular values than the bases need:
        # {key: (found, needed)}; the bases' directions past ``found`` are arbitrary (:func:`~giva.bases.numerical_rank`).
        self.rank_deficient: dict[str, tuple[int, int]] = {}
        # Per target: the test matrix of the next pass (sketch), then (A, B) after the last pass.
        self._state: dict[str, Optional[tuple[torch.Tensor, ...]]] = {}
        for key, t in self.targets.items():
            if mode == "sketch":
                self._state[key] = (sketch.gaussian_test_matrix(self._test_rows(t, 0), self.width(key), t.seed, t.key),)

    @property
    def done(self) -> bool:
        return self.pass_index == self.passes and all(self._state.get(key) is not None for key in self.targets)

    def width(self, key: str) -> int:
        """Sketch columns ``l`` of a target (its full smaller dimension in exact mode)."""
        t = self.targets[key]
        rows = self._test_rows(t, 0)
        if self.mode == "exact":
            return min(rows, t.in_features)
        return sketch.sketch_width(t.singular_vectors, rows, t.in_features, self.oversampling)

    def _test_rows(self, t: Target, pass_index: int) -> int:
        """Rows of the test matrix ``M`` of a sketch pass: the mean's passes alternate ``G^T M`` (``M``: ``out x l``,
        even passes) and ``G M`` (``M``: ``in x l``); the second moment's are all ``S M`` (``S``: ``in x in``)."""
        return t.out_size if self.statistic == "mean" and pass_index % 2 == 0 else t.in_features

    def next_request(self) -> Request:
        """What to accumulate in the next pass (the same in every process for the same targets and seeds)."""
        if self.pass_index >= self.passes:
            raise RuntimeError("the session is finished: call bases()")
        waiting = [key for key in self.targets if self.mode == "sketch" and self._state.get(key) is None]
        if waiting:
            raise RuntimeError(f"targets {waiting[:3]} still wait for set_state() from the process that computed them")
        items = {}
        for key, t in self.targets.items():
            if self.mode == "exact":
                items[key] = RequestItem(t.layer, t.out_start, t.out_size, "gram" if self.statistic == "second-moment" else "dense")
            else:
                kind: Kind = "gram_m" if self.statistic == "second-moment" else "gt" if self.pass_index % 2 == 0 else "g"
                items[key] = RequestItem(t.layer, t.out_start, t.out_size, kind, self._state[key][0])
        return Request(self.pass_index, self.passes, items)

    def sum_shape(self, key: str) -> tuple[int, int]:
        """Shape of the sum the current pass asks for ``key``, known without any batch: ``out x in`` (exact) or ``in x in``
        (exact second moment); ``in x l`` (``G^T M``, ``S M``) or ``out x l`` (``G M``) in a sketch pass."""
        t = self.targets[key]
        if self.mode == "exact":
            return (t.in_features if self.statistic == "second-moment" else t.out_size, t.in_features)
        rows = t.out_size if self.statistic == "mean" and self.pass_index % 2 == 1 else t.in_features
        return (rows, self.width(key))

    def check(self, partial: Partial) -> None:
        """Raise :class:`GradientInitError` (naming the layer) if a summed partial cannot be used."""
        if partial.pass_index != self.pass_index:
            raise ValueError(f"partial of pass {partial.pass_index} given to a session at pass {self.pass_index}")
        if partial.batches < 1:
            raise GradientInitError("the partial sums cover no calibration batch")
        missing = sorted({self.targets[key].layer for key in self.targets if key not in partial.sums})
        if missing:
            raise GradientInitError(
                f"GiVA layer(s) {missing[:5]} received no gradient ({NO_GRADIENT_CAUSES}); if they are not on the "
                "loss's path, remove them from target_modules"
            )
        for key, total in partial.sums.items():
            check_gradient_sum(total, self.targets[key].layer, self.targets[key].block)

    def receive(self, partial: Partial, keys: Optional[Iterable[str]] = None) -> None:
        """Take the sums of the current pass (over every process) and compute the next state.

        ``keys``: compute only these targets (a distributed run splits the QR/SVD work); the others
        must then be given with :meth:`set_state` before the next request. Default: all.
        The sums are used as they are, not divided by the number of batches: the QR and SVD give the
        same orthonormal factors for any positive multiple of a matrix, and a mean would copy every
        dense exact-mode sum (1.6 GB on a 0.5B model). ``partial`` is read, never modified.
        The QR, SVD and products run with autocast off (in fp32), also when called inside ``torch.autocast``.
        """
        self.check(partial)
        self.batches = partial.batches
        own = list(self.targets) if keys is None else list(keys)
        final = self.pass_index + 1 == self.passes
        new_state: dict[str, Optional[tuple[torch.Tensor, ...]]] = {key: None for key in self.targets}
        with autocast_off(*{total.device for total in partial.sums.values()}):
            for key in own:
                new_state[key] = self._advance(self.targets[key], partial.sums[key], final)
        self._state = new_state
        self.pass_index += 1

    def _advance(self, t: Target, total: torch.Tensor, final: bool) -> tuple[torch.Tensor, ...]:
        generator = layer_generator(t.seed, t.layer, t.block)
        if self.statistic == "second-moment":
            shape = (t.in_features, t.in_features)
            if self.mode == "exact":
                values, v = top_eigenpairs(total, t.rank)
            elif not final:
                return (sketch.orthonormal_columns(total),)
            else:
                values, v = sketch.eigenvectors_from_sketch(total, self._state[t.key][0].to(total.device), t.rank)
            self._note_rank(t, numerical_rank(values, shape, gram=True))
            return bases_from_input_vectors(v, t.out_size, t.rank, t.variant, generator)
        shape = (t.out_size, t.in_features)
        if self.mode == "exact":
            a, b, values = gradient_bases(total, t.rank, t.variant, generator, t.svd, t.seed)
            self._note_rank(t, numerical_rank(values, shape))
            return a, b
        if not final:
            return (sketch.orthonormal_columns(total),)
        product_is_gt = self.pass_index % 2 == 0
        u, values, v = sketch.singular_vectors_from_sketch(total, self._state[t.key][0].to(total.device), product_is_gt,
                                                           t.singular_vectors)
        self._note_rank(t, numerical_rank(values, shape))
        return bases_from_singular_vectors(u, v, t.rank, t.variant, generator)

    def _note_rank(self, t: Target, found: int) -> None:
        needed = t.singular_vectors if self.statistic == "mean" else t.rank
        if found < needed:
            self.rank_deficient[t.key] = (found, needed)

    def rank_message(self) -> Optional[str]:
        """A warning naming the targets of :attr:`rank_deficient` (None if there are none)."""
        return rank_message({(self.targets[key].layer, self.targets[key].block): counts
                             for key, counts in self.rank_deficient.items()})

    def state_shapes(self, key: str) -> list[tuple[int, ...]]:
        """Shapes of the state :meth:`receive` computes for ``key`` (to receive it from another process)."""
        t = self.targets[key]
        if self.pass_index == self.passes:
            return [(t.rank, t.in_features), (t.out_size, t.rank)]
        return [(self._test_rows(t, self.pass_index), self.width(key))]

    def state(self, key: str) -> tuple[torch.Tensor, ...]:
        value = self._state.get(key)
        if value is None:
            raise KeyError(f"target {key} has no state in this process")
        return value

    def set_state(self, key: str, tensors: Iterable[torch.Tensor]) -> None:
        tensors = tuple(tensors)
        if [tuple(x.shape) for x in tensors] != self.state_shapes(key):
            raise ValueError(f"state for {key} must have shapes {self.state_shapes(key)}")
        self._state[key] = tensors

    def nbytes(self) -> int:
        """Bytes of per-target state held between passes (independent of the number of batches)."""
        return sum(x.numel() * x.element_size() for value in self._state.values() if value for x in value)

    def bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{key: (A r x in, B out x r)}`` in fp32 once :attr:`done`."""
        if not self.done:
            raise RuntimeError(f"the session is at pass {self.pass_index} of {self.passes}: not done")
        return {key: (value[0].cpu(), value[1].cpu()) for key, value in self._state.items()}
