"""What the server and the clients send each other, and how many bytes it takes on the wire.

Every exchange is a Flower ``Message`` whose content is a ``RecordDict``:

====================  ==========  ====================================================================
message type          direction   content
====================  ==========  ====================================================================
``query.partition``   down        nothing: asked first, before the server loads the model
``query.partition``   up          metrics: ``partition-id``, ``num-partitions`` (the node config's shard)
``query.statistics``  down        config: the pass to run (sketch / dense), calibration batches, seed
``query.statistics``  up          arrays: one summed statistic per adapted block;
                                  metrics: ``num-examples`` (the weight of this client's sums)
``query.bases``       down        arrays: the agreed input bases ``A`` (GiVA) or VeRA's projections;
                                  B never travels (regenerated from the seed)
``query.bases``       up          metrics: ``num-stored`` (acknowledgement)
``train``             down        arrays: the global trainable tensors; config: round, steps, LR
``train``             up          arrays: the client's trainable tensors after local steps;
                                  metrics: ``num-examples``, ``train-loss``
====================  ==========  ====================================================================

Tensors travel packed: one flat array per message, in an order both sides derive from their own
copy of the model (its trainable parameters, its adapted blocks), so no names or per-tensor headers
are sent; :func:`unpack` checks the sizes against the receiver's layout.

The byte count of a message is what Flower actually ships: Flower deflates a message into a
tree of objects (the message, its ``RecordDict``, each record, each array and the array's chunks),
each serialised once with its header, and identical objects are sent once. :func:`message_bytes`
sums ``len(obj.deflate())`` over that de-duplicated tree, i.e. the bytes pushed for the message.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

PARTITION = "query.partition"
STATISTICS = "query.statistics"
BASES = "query.bases"
TRAIN = "train"

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"


Layout = list[tuple[str, tuple[int, ...]]]
PACKED = "packed"


def layout_of(tensors: dict[str, torch.Tensor]) -> Layout:
    """Names and shapes, in order: what a receiver needs to unpack a flat array."""
    return [(name, tuple(t.shape)) for name, t in tensors.items()]


def pack(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """All tensors flattened into one 1-D CPU tensor, in dict order (one dtype for all)."""
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"packed tensors must share one dtype, got {sorted(map(str, dtypes))}")
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors.values()])


def unpack(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pack` for the receiver's ``layout``; a size mismatch is an error."""
    expected = sum(math.prod(shape) for _, shape in layout)
    if flat.numel() != expected:
        raise ValueError(
            f"a packed message holds {flat.numel()} numbers but this side's layout expects {expected} "
            f"({len(layout)} tensors): the server and the client do not hold the same model / adapter config"
        )
    out, offset = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = flat[offset : offset + size].reshape(shape).clone()
        offset += size
    return out


# Flower's arrays go through numpy, which has no bfloat16: such a packed array travels as its int16 bit
# pattern under this name (the same 2 bytes a number).
PACKED_BF16 = "packed-bfloat16"


def tensors_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` with the tensors packed into one array (their dtype is kept, bfloat16 included)."""
    flat = pack(tensors)
    if flat.dtype == torch.bfloat16:
        return ArrayRecord({PACKED_BF16: flat.view(torch.int16)})
    return ArrayRecord({PACKED: flat})


def record_tensors(record: ArrayRecord, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors of a packed ``ArrayRecord``, named and shaped by ``layout``."""
    arrays = record.to_torch_state_dict()
    if PACKED_BF16 in arrays:
        return unpack(arrays[PACKED_BF16].view(torch.bfloat16), layout)
    return unpack(arrays[PACKED], layout)


def make_content(
    tensors: dict[str, torch.Tensor] | None = None,
    config: dict[str, int | float | str | bool] | None = None,
    metrics: dict[str, int | float] | None = None,
) -> RecordDict:
    """A ``RecordDict`` with the optional ``arrays`` / ``config`` / ``metrics`` records."""
    content = RecordDict()
    if tensors is not None:
        content[ARRAYS] = tensors_record(tensors)
    if config is not None:
        content[CONFIG] = ConfigRecord(dict(config))
    if metrics is not None:
        content[METRICS] = MetricRecord(dict(metrics))
    return content


def message_bytes(message: Message) -> int:
    """Bytes Flower pushes for ``message``: every object of its tree serialised once (identical ones once)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def payload_bytes(message: Message) -> int:
    """Raw bytes of the tensors in the message's ``arrays`` record (no headers): a lower bound."""
    if not message.has_content() or ARRAYS not in message.content:
        return 0
    return sum(t.numel() * t.element_size() for t in message.content[ARRAYS].to_torch_state_dict().values())


def roundtrip(message: Message) -> tuple[Message, int]:
    """Serialise ``message`` as Flower does and rebuild it from those bytes; returns the copy and the byte count.

    The in-process engine sends every message through this, so a client never sees the server's
    objects, only what the bytes carried.
    """
    objects = get_all_nested_objects(message)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    size = sum(len(c) for c in contents.values())
    copy = inflate_object_from_contents(message.object_id, contents, keep_object_contents=False)
    assert isinstance(copy, Message)
    return copy, size


@dataclass
class Traffic:
    """Bytes of one round: per client, down (server -> client) and up (client -> server)."""

    phase: str  # "setup" or "train"
    round: int
    down: list[int] = field(default_factory=list)
    up: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.down) + sum(self.up)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}
