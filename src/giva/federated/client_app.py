"""The Flower ClientApp: a client answers the setup round from its own shard, then trains locally.

Handlers (message types in :mod:`.messages`):

* ``query.partition``: the node's ``partition-id`` and ``num-partitions`` (nothing loads), so the server can
  check that the nodes hold each shard of the run once before any work.
* ``query.statistics``: GiVA gradient statistics of the client's calibration batches (sketch or dense),
  already multiplied by its example counts, plus ``num-examples``.
* ``query.bases``: store the agreed ``A`` (GiVA) or VeRA's projections in the node's persistent
  ``context.state``; later rounds read them from there.
* ``train``: load the global trainable tensors, take ``local-steps`` AdamW steps on the shard, send
  the trainable tensors back with ``num-examples``.

The client's shard is ``partition-id`` of ``num-partitions`` from the node config (set by the
simulation engine, or ``flower-supernode --node-config "partition-id=0 num-partitions=4"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Optional

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from ..init import LossScale, Partial, accumulate
from . import messages
from .statistics import (
    apply_bases,
    bases_layout,
    client_request,
    dense_statistics,
    matrix_layout,
    sketch_session,
)
from .task import (
    SKETCH_DTYPES,
    FederatedConfig,
    Task,
    build_model,
    cached_task,
    client_seed,
    load_projection_state,
    load_trainable_state,
    local_train,
    projection_state,
    trainable_state,
)

logger = logging.getLogger(__name__)

STATE_KEY = "giva-setup"  # the node's context.state record holding what the setup round delivered
# context.state: the fp16 loss scale where the client's last sketch pass left it (its value, limit and count of clean
# batches). The passes of one setup share it, as giva.init.initialize's do: a later pass starts where the one before
# settled instead of halving it down from the start again.
SCALE_KEY = "giva-loss-scale"

TaskFactory = Callable[[FederatedConfig], Task]


def default_task(config: FederatedConfig) -> Task:
    return cached_task(tuple(sorted(vars(config).items())))


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"the node config has no {err.args[0]!r}: start the SuperNode with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        ) from err


class _ModelCache:
    """One model per process and config; every call reloads bases and trainable tensors, so the
    virtual clients sharing a simulation worker never see each other's state."""

    def __init__(self) -> None:
        self.task: Optional[Task] = None
        self.config: Optional[FederatedConfig] = None
        self.model: Optional[torch.nn.Module] = None

    def get(self, task: Task, config: FederatedConfig) -> torch.nn.Module:
        if self.task is not task or self.config != config:
            self.model, self.task, self.config = build_model(task, config), task, config
        return self.model


def make_client_app(
    task_factory: TaskFactory = default_task, config: Optional[FederatedConfig] = None
) -> ClientApp:
    """A ClientApp for ``config`` (default: read from the run config, as ``flwr run`` passes it)."""
    app = ClientApp()
    cache = _ModelCache()

    def setup(context: Context) -> tuple[FederatedConfig, Task, int, int]:
        cfg = config or FederatedConfig.from_flat(dict(context.run_config))
        partition, num_partitions = _partition(context)
        return cfg, task_factory(cfg), partition, num_partitions

    def prepared_model(context: Context, cfg: FederatedConfig, task: Task) -> torch.nn.Module:
        model = cache.get(task, cfg)
        if STATE_KEY in context.state:
            record = context.state[STATE_KEY]
            if cfg.method == "giva":
                apply_bases(model, messages.record_tensors(record, bases_layout(model)))
            elif cfg.method == "vera":
                load_projection_state(model, messages.record_tensors(record, messages.layout_of(projection_state(model))))
        elif cfg.method == "giva":
            raise RuntimeError("a GiVA client was asked to train before the setup round delivered its bases")
        return model

    @app.query("partition")
    def shard(msg: Message, context: Context) -> Message:
        partition, num_partitions = _partition(context)
        metrics = {"partition-id": partition, "num-partitions": num_partitions}
        return Message(messages.make_content(metrics=metrics), reply_to=msg)

    @app.query("statistics")
    def statistics(msg: Message, context: Context) -> Message:
        cfg, task, partition, num_partitions = setup(context)
        request = msg.content[messages.CONFIG]
        model = cache.get(task, cfg)
        # The same batches on every pass of a session (the task's calibration batches are seeded).
        batches = task.calibration_batches(partition, num_partitions, int(request["num-batches"]))
        examples = sum(int(b["labels"].shape[0]) for b in batches)
        if request["mode"] == "dense":
            sums, count = dense_statistics(model, batches)
            metrics = {"num-examples": count}
        else:
            oversampling = int(request["oversampling"])
            session = sketch_session(model, int(request["passes"]), None if oversampling == -1 else oversampling)
            kind = str(request["kind"])
            dtype = SKETCH_DTYPES[str(request["sketch-dtype"])]
            matrices = {}
            if messages.ARRAYS in msg.content:
                layout = matrix_layout(session, kind)
                matrices = {k: m.float() for k, m in messages.record_tensors(msg.content[messages.ARRAYS], layout).items()}
            pass_index = int(request["pass-index"])
            work = client_request(session, pass_index, kind, matrices)
            scale = LossScale()
            if pass_index > 0 and SCALE_KEY in context.state:  # pass 0 starts a new setup
                scale = LossScale(**context.state[SCALE_KEY])
            partial: Partial = accumulate(model, batches, work, scale=scale)
            context.state[SCALE_KEY] = ConfigRecord(asdict(scale))  # every field of it, whatever LossScale holds
            # Packed in the order the server unpacks, in the run's transport dtype.
            sums = {key: partial.sums[key].to(dtype) for key in session.targets}
            metrics = {"num-examples": examples, "batches": partial.batches, "tokens": partial.tokens}
        logger.info("client %d: %s statistics of %d examples", partition, request["mode"], examples)
        return Message(messages.make_content(sums, metrics=metrics), reply_to=msg)

    @app.query("bases")
    def bases(msg: Message, context: Context) -> Message:
        record = msg.content[messages.ARRAYS]
        context.state[STATE_KEY] = record
        return Message(messages.make_content(metrics={"num-stored": len(record)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, task, partition, num_partitions = setup(context)
        request = msg.content[messages.CONFIG]
        model = prepared_model(context, cfg, task)
        layout = messages.layout_of(trainable_state(model))
        load_trainable_state(model, messages.record_tensors(msg.content[messages.ARRAYS], layout))
        round_index = int(request["round"])
        batches = task.train_batches(partition, num_partitions, round_index)  # seeded by the round
        losses = local_train(model, batches, int(request["local-steps"]), float(request["lr"]),
                             seed=client_seed(cfg.seed, round_index, partition))
        metrics = {"num-examples": task.shard_size(partition, num_partitions), "train-loss": sum(losses) / len(losses)}
        return Message(messages.make_content(trainable_state(model), metrics=metrics), reply_to=msg)

    return app


app = make_client_app()
