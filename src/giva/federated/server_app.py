"""The Flower ServerApp: one setup round that agrees on the frozen bases, then FedAvg of the trainable tensors.

Handshake (before the model loads): ``query.partition`` asks every node which shard its node config names;
the run stops unless the nodes hold partition-ids ``0..clients-1`` once each, all of ``num-partitions ==
clients``. Its bytes are reported apart (``handshake``), not in any method's totals: every method sends it.

Setup (before round 1):

* GiVA: ``query.statistics`` to every client -> each returns its shard's summed sketch (or dense
  gradient) and example count -> the server adds them up (exactly what one process computes over the
  union of the shards), takes the SVD, and sends every client ``A`` in ``query.bases``, in the dtype the
  model stores it (``bases_dtype``: float32, or bfloat16 at half the bytes). ``B`` is seeded, so it never travels.
* VeRA with ``vera-projections``: the shared random projections in ``query.bases``; without, nothing
  (clients regenerate them from the PRNG key).
* LoRA: nothing (its initial factors travel with round 1's global state).

Rounds ``1..R``: ``train`` sends the global trainable tensors (GiVA: ``lambda_s``, ``lambda_o`` and the
head; LoRA: A, B and the head; VeRA: ``lambda_b``, ``lambda_d`` and the head); every client returns
its tensors after ``local-steps`` steps; the server replaces the global ones by their example-weighted
mean (FedAvg) and evaluates on the held-out split. Every message's serialized size is recorded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..init import Partial, write_bases
from . import messages
from .client_app import TaskFactory, default_task
from .files import write_checkpoint, write_json
from .statistics import (
    add_partials,
    apply_bases,
    block_specs,
    combine_statistics,
    dense_bases,
    dense_layout,
    read_bases,
    record_bases_info,
    sketch_session,
    sums_layout,
)
from .task import (
    CLI_BATCH_OPTIONS,
    FederatedConfig,
    Task,
    accuracy,
    build_model,
    check_shards,
    fedavg,
    load_trainable_state,
    peft_config,
    projection_state,
    trainable_state,
)

logger = logging.getLogger(__name__)

ResultSink = Callable[[dict[str, Any]], None]
# What a client's statistics reply reports besides its sums (sketch mode; dense sends num-examples only).
STATISTICS_REPLY_METRICS = ("num-examples", "batches", "tokens")
NODE_WAIT_SECONDS = 600.0


def wait_for_nodes(grid: Grid, count: int, timeout: float = NODE_WAIT_SECONDS) -> list[int]:
    """The first ``count`` connected node ids (sorted), waiting up to ``timeout`` seconds for them."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes[:count]
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {count} clients connected within {timeout:.0f} s")
        time.sleep(0.2)


def exchange(
    grid: Grid, nodes: list[int], message_type: str, content: RecordDict, group: str
) -> tuple[list[Message], messages.Traffic]:
    """Send ``content`` to every node and collect the replies, in node order, with their byte counts."""
    phase, _, round_index = group.partition("-")
    traffic = messages.Traffic(phase=phase, round=int(round_index or 0))
    outgoing = [Message(content, dst_node_id=node, message_type=message_type, group_id=group) for node in nodes]
    traffic.down = [messages.message_bytes(m) for m in outgoing]
    replies = {reply.metadata.src_node_id: reply for reply in grid.send_and_receive(outgoing)}
    missing = [node for node in nodes if node not in replies]
    if missing:
        raise RuntimeError(f"{message_type} ({group}): no reply from node(s) {missing}")
    failed = {node: replies[node].error.reason for node in nodes if replies[node].has_error()}
    if failed:
        raise RuntimeError(f"{message_type} ({group}): client error(s) {failed}")
    ordered = [replies[node] for node in nodes]
    traffic.up = [messages.message_bytes(r) for r in ordered]
    return ordered, traffic


def check_replies(nodes: list[int], states: list[dict[str, torch.Tensor]], losses: list[float], round_index: int) -> None:
    """A RuntimeError naming the nodes whose round ``round_index`` reply holds a non-finite tensor or loss: averaged
    in, it made the global state NaN, which the run then scored, checkpointed and went on from."""
    named_by_node = {node: [name for name, t in state.items() if not bool(torch.isfinite(t).all())]
                     + ([] if math.isfinite(loss) else ["train-loss"]) for node, state, loss in zip(nodes, states, losses)}
    bad = {node: names for node, names in named_by_node.items() if names}
    if bad:
        named = "; ".join(f"node {node}: {', '.join(names[:3])}" for node, names in bad.items())
        raise RuntimeError(f"round {round_index}: non-finite values in the replies of {len(bad)} client(s) ({named}); "
                           f"nothing of the round was averaged or checkpointed (the checkpoint holds round {round_index - 1})")


def check_partitions(held: dict[int, tuple[int, int]], clients: int) -> None:
    """A ValueError naming the nodes unless ``held`` (node -> (partition-id, num-partitions) of its node config)
    covers partition-ids ``0..clients-1`` once each, all of ``num-partitions == clients``. SuperNodes started by
    hand can repeat an id or name another count; the run would train on duplicated or missing shards unseen."""
    ids = [partition for partition, _ in held.values()]
    problems = [f"partition-id {p} is held by nodes {[n for n, (q, _) in held.items() if q == p]}"
                for p in sorted(set(ids)) if ids.count(p) > 1]
    missing = sorted(set(range(clients)) - set(ids))
    if missing:
        problems.append(f"no node holds partition-id(s) {missing}")
    counts = {node: n for node, (_, n) in held.items() if n != clients}
    if counts:
        problems.append(f"node(s) {sorted(counts)} have num-partitions {sorted(set(counts.values()))}")
    if problems:
        nodes = ", ".join(f"{node} holds {p} of {n}" for node, (p, n) in sorted(held.items()))
        raise ValueError(
            f"the nodes' shards do not match the run's {clients} clients: {'; '.join(problems)} ({nodes}); expected "
            f"partition-id 0..{clients - 1} once each and num-partitions {clients}: start each SuperNode with "
            f"--node-config \"partition-id=<i> num-partitions={clients}\""
        )


def handshake(grid: Grid, nodes: list[int], clients: int) -> messages.Traffic:
    """Ask every node for its shard (``query.partition``) and check them (:func:`check_partitions`)."""
    replies, traffic = exchange(grid, nodes, messages.PARTITION, messages.make_content(), "handshake")
    metrics = [reply.content[messages.METRICS] for reply in replies]
    check_partitions({node: (int(m["partition-id"]), int(m["num-partitions"])) for node, m in zip(nodes, metrics)},
                     clients)
    return traffic


def setup_giva(grid: Grid, nodes: list[int], model: Any, cfg: FederatedConfig) -> tuple[list[messages.Traffic], dict]:
    """The GiVA setup: statistics pass(es), then ``A`` to every client; the bases are written into ``model``."""
    traffic: list[messages.Traffic] = []
    common = {"mode": cfg.init_mode, "num-batches": cfg.num_batches, "passes": cfg.passes, "oversampling": cfg.oversample,
              "sketch-dtype": cfg.sketch_dtype}
    if cfg.init_mode == "dense":
        request = messages.make_content(config=common)
        replies, t = exchange(grid, nodes, messages.STATISTICS, request, "setup-1")
        traffic.append(t)
        parts = [
            (messages.record_tensors(r.content[messages.ARRAYS], dense_layout(model)),
             int(r.content[messages.METRICS]["num-examples"]))
            for r in replies
        ]
        stats, count = combine_statistics(parts)
        apply_bases(model, dense_bases(block_specs(model), stats, count, peft_config(cfg)))
        bases = read_bases(model)  # A as the model stores it (GivaConfig.bases_dtype): what travels
    else:
        session = sketch_session(model, cfg.passes, cfg.sketch_oversampling)
        dtype = cfg.transport_dtype
        count = 0
        while not session.done:
            request = session.next_request()
            kinds = {item.kind for item in request.items.values()}
            kind = kinds.pop()
            # Pass 0's test matrices are seeded: every client builds them itself. Later ones depend on the data.
            matrices = None
            if request.pass_index > 0:
                matrices = {k: item.matrix.to(dtype) for k, item in request.items.items()}
                for key, matrix in matrices.items():  # the server finishes with exactly the matrices the clients used
                    session.set_state(key, (matrix.float(),))
            content = messages.make_content(matrices, config={**common, "pass-index": request.pass_index, "kind": kind})
            replies, t = exchange(grid, nodes, messages.STATISTICS, content, f"setup-{len(traffic) + 1}")
            traffic.append(t)
            parts = [
                Partial(request.pass_index,
                        {k: v.float() for k, v in
                         messages.record_tensors(r.content[messages.ARRAYS], sums_layout(session, kind)).items()},
                        batches=int(r.content[messages.METRICS]["batches"]), tokens=int(r.content[messages.METRICS]["tokens"]))
                for r in replies
            ]
            count = sum(int(r.content[messages.METRICS]["num-examples"]) for r in replies)
            session.receive(add_partials(parts))
        write_bases(model, session)
        if (message := session.rank_message()) is not None:
            logger.warning(message)
        record_bases_info(model)
        bases = read_bases(model)  # A as the model stores it (GivaConfig.bases_dtype): what travels
    _, t = exchange(grid, nodes, messages.BASES, messages.make_content(bases), f"setup-{len(traffic) + 1}")
    traffic.append(t)
    info = {"mode": cfg.init_mode, "calibration_examples": count, "blocks": len(bases),
            "passes": 1 if cfg.init_mode == "dense" else cfg.passes}
    return traffic, info


def check_data(task: Task, cfg: FederatedConfig, options: str = CLI_BATCH_OPTIONS) -> None:
    """A ValueError naming the data unless every client gets a shard it can work with: at least one training
    sentence (every method), and for GiVA its calibration batches. Called before the model loads and before the
    first checkpoint is written: a refused run leaves no checkpoint behind that would block the corrected command
    in the same output folder ("of another run config"). ``options``: see :func:`check_shards`."""
    try:
        smallest = min(task.shard_size(p, cfg.clients) for p in range(cfg.clients))
    except ValueError as err:  # shard_indices: fewer training sentences than clients
        raise ValueError(f"data {cfg.data!r}: {err}; use fewer clients or more training data") from None
    if cfg.method == "giva":
        check_shards(smallest, cfg, f"data {cfg.data!r} split over {cfg.clients} clients", options)


def _load_checkpoint(path: Optional[str], cfg: FederatedConfig) -> Optional[dict[str, Any]]:
    if not path or not Path(path).exists():
        return None
    saved = torch.load(path, weights_only=False)
    if not cfg.same_run(saved["config"]):
        raise ValueError(f"checkpoint {path} is of another run config; delete it or use another output folder")
    return saved


def run_server(
    grid: Grid, cfg: FederatedConfig, task_factory: TaskFactory = default_task, checkpoint: Optional[str] = None
) -> dict[str, Any]:
    """The whole federated run on ``grid``; returns the results (accuracy and bytes per round).

    ``checkpoint``: a file written after the setup and after every round (the global state, what the
    setup delivered, the results so far). A run given an existing checkpoint of the same config goes on
    from its last round: it sends the setup's result (``A`` / VeRA's projections) to the clients again
    without counting those bytes (the run already paid them once) and continues exactly (the clients'
    optimizers start afresh every round and their batches are seeded by the round).
    """
    start = time.perf_counter()
    task = task_factory(cfg)
    check_data(task, cfg)
    nodes = wait_for_nodes(grid, cfg.clients)
    shards = handshake(grid, nodes, cfg.clients)
    model = build_model(task, cfg)
    test = task.test_batches()
    setup: list[messages.Traffic] = []
    setup_info: dict[str, Any] = {}
    saved = _load_checkpoint(checkpoint, cfg)
    delivered: Optional[dict[str, torch.Tensor]] = None  # what the setup sent the clients (A / projections)

    if saved is not None:
        setup, setup_info, delivered = [messages.Traffic(**t) for t in saved["setup"]], saved["setup_info"], saved["delivered"]
        if delivered is not None:
            if cfg.method == "giva":
                apply_bases(model, delivered)
            exchange(grid, nodes, messages.BASES, messages.make_content(delivered), "setup-0")  # round 0: a resent setup message, not counted
        load_trainable_state(model, saved["trainable"])
        rounds = saved["rounds"]
        logger.info("%s: resuming after round %d from %s", cfg.method, len(rounds) - 1, checkpoint)
    else:
        if cfg.method == "giva":
            setup, setup_info = setup_giva(grid, nodes, model, cfg)
            delivered = read_bases(model)
        elif cfg.method == "vera" and cfg.vera_projections:
            delivered = projection_state(model)
            _, traffic = exchange(grid, nodes, messages.BASES, messages.make_content(delivered), "setup-1")
            setup.append(traffic)
        rounds = [{"round": 0, "accuracy": accuracy(model, test), "train_loss": None, "traffic": None}]
        logger.info("%s: accuracy before training %.4f", cfg.method, rounds[0]["accuracy"])
    elapsed = saved["seconds"] if saved is not None else 0.0

    def save() -> None:
        write_checkpoint(checkpoint, {
            "config": asdict(cfg), "setup": [asdict(t) for t in setup], "setup_info": setup_info,
            "delivered": delivered, "trainable": trainable_state(model), "rounds": rounds,
            "seconds": elapsed + time.perf_counter() - start})

    save()
    for r in range(len(rounds), cfg.rounds + 1):
        config = {"round": r, "local-steps": cfg.local_steps, "lr": cfg.round_lr(r)}
        content = messages.make_content(trainable_state(model), config=config)
        replies, traffic = exchange(grid, nodes, messages.TRAIN, content, f"train-{r}")
        layout = messages.layout_of(trainable_state(model))
        states = [messages.record_tensors(reply.content[messages.ARRAYS], layout) for reply in replies]
        weights = [int(reply.content[messages.METRICS]["num-examples"]) for reply in replies]
        losses = [float(reply.content[messages.METRICS]["train-loss"]) for reply in replies]
        check_replies(nodes, states, losses, r)  # before the average and the checkpoint: a resume starts clean
        load_trainable_state(model, fedavg(states, weights))
        rounds.append({
            "round": r,
            "accuracy": accuracy(model, test),
            "train_loss": sum(w * x for w, x in zip(weights, losses)) / sum(weights),
            "traffic": traffic.as_dict(),
        })
        logger.info("%s round %d: accuracy %.4f, %d bytes", cfg.method, r, rounds[-1]["accuracy"], traffic.total)
        save()

    trainable = trainable_state(model)
    return {
        "config": asdict(cfg),
        "nodes": nodes,
        "handshake": shards.as_dict(),
        "setup": [t.as_dict() for t in setup],
        "setup_info": setup_info,
        "setup_bytes": sum(t.total for t in setup),
        "rounds": rounds,
        "trainable_tensors": len(trainable),
        "trainable_parameters": sum(t.numel() for t in trainable.values()),
        "seconds": elapsed + time.perf_counter() - start,
    }


def make_server_app(
    config: Optional[FederatedConfig] = None,
    task_factory: TaskFactory = default_task,
    sink: Optional[ResultSink] = None,
    checkpoint: Optional[str] = None,
) -> ServerApp:
    """A ServerApp for ``config`` (default: the run config of ``flwr run``); results go to ``sink``
    or, under ``flwr run``, to the JSON file named by the run-config key ``results-path`` if set.
    ``checkpoint`` (or the run-config key ``checkpoint-path``): see :func:`run_server`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        results_path = run_config.pop("results-path", None)
        checkpoint_path = run_config.pop("checkpoint-path", None) or checkpoint
        cfg = config or FederatedConfig.from_flat(run_config)
        results = run_server(grid, cfg, task_factory, checkpoint_path)
        if sink is not None:
            sink(results)
        if results_path:
            write_json(results, str(results_path))

    return app


app = make_server_app()
