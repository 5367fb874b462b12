"""Running the Flower app here: Flower's simulation engine (Ray) or an in-process grid, the centralised
baseline, and the results files (JSON, markdown table, accuracy-vs-megabytes plot).

The in-process grid delivers each message to the ClientApp in this process after a full round trip
through Flower's serialization (the client only sees what the bytes carried); it is what the tests and
quick runs use. ``engine="simulation"`` runs the same ServerApp / ClientApp under
``flwr.simulation.run_simulation`` with one Ray worker per CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from ..bases import cuda_indices, seed_devices
from ..peft_compat import ignore_library_deprecations
from . import messages
from .client_app import TaskFactory, default_task, make_client_app
from .files import write_checkpoint, write_json
from .server_app import check_data, make_server_app, run_server
from .statistics import sketch_session
from .task import (
    METHODS,
    FederatedConfig,
    accuracy,
    build_model,
    cached_task,
    client_seed,
    load_trainable_state,
    trainable_state,
)

logger = logging.getLogger(__name__)

ENGINES: tuple[str, ...] = ("inprocess", "simulation")
CENTRAL_PARTITION = -1  # the centralised baseline's dropout seeds: client_seed(seed, round, -1)
SERVER_NODE_ID = 1


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one persistent ``Context`` per node.

    Every message and reply goes through ``messages.roundtrip`` (deflate to bytes, inflate back);
    ``sent`` records ``(message_type, dst, down_bytes, up_bytes)`` for each exchange, and with
    ``keep_log`` ``log`` keeps the delivered ``(message, reply)`` copies (for tests).
    """

    def __init__(
        self, client_app: ClientApp, num_nodes: int, run_config: Optional[dict[str, Any]] = None, keep_log: bool = False
    ) -> None:
        self._run = Run.create_empty(run_id=1)
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self.sent: list[tuple[str, int, int, int]] = []
        self.keep_log = keep_log
        self.log: list[tuple[Message, Message]] = []
        self._counter = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: Optional[float] = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages_: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages_:
            dst = message.metadata.dst_node_id
            if dst not in self.contexts:
                raise ValueError(f"no node {dst}; the nodes are {sorted(self.contexts)}")
            self._counter += 1
            key = f"m{self._counter}"  # a local handle; Flower's message ids are the SuperLink's business
            delivered, down = messages.roundtrip(message)
            reply = self.client_app(delivered, self.contexts[dst])
            returned, up = messages.roundtrip(reply)
            self.sent.append((message.metadata.message_type, dst, down, up))
            self._replies[key] = returned
            if self.keep_log:
                self.log.append((delivered, returned))
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages_: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages_))


class _ServerIdentity:
    """Flower stamps outgoing messages with the running task's identity; set it for an in-process server."""

    def __enter__(self) -> None:
        self.saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SERVER_NODE_ID

    def __exit__(self, *exc: Any) -> None:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = self.saved


def run_inprocess(
    cfg: FederatedConfig, task_factory: TaskFactory = default_task, keep_log: bool = False,
    checkpoint: Optional[str] = None,
) -> tuple[dict[str, Any], InProcessGrid]:
    """The ServerApp logic against an :class:`InProcessGrid` of ``cfg.clients`` ClientApps (resumable from
    ``checkpoint``, see :func:`giva.federated.server_app.run_server`)."""
    grid = InProcessGrid(make_client_app(task_factory, cfg), cfg.clients, keep_log=keep_log)
    with _ServerIdentity():
        results = run_server(grid, cfg, task_factory, checkpoint)
    return results, grid


# Loggers of the libraries a run drives: their INFO lines (Flower's per-round messages, transformers' load
# reports, the "setup plugin" lines of alembic, which migrates the simulation engine's state database at every
# start) drown the run's own output; --verbose keeps them.
LIBRARY_LOGGERS = ("flwr", "ray", "alembic", "transformers", "datasets", "httpx", "urllib3", "filelock")
# How Flower's deprecation notices begin: logged as WARNING on the "flwr" logger (giva's run_simulation calls
# Flower's deprecated run_simulation for the user, who has nothing to change), printed by Flower's own handler
# and again by the root one.
FLOWER_DEPRECATION = "DEPRECATED FEATURE"


def _not_flower_deprecation(record: logging.LogRecord) -> bool:
    """A logger filter: False for Flower's deprecation notices, which then reach no handler at all."""
    return not str(record.msg).startswith(FLOWER_DEPRECATION)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Show only warnings and errors of Flower, Ray, transformers and the like (giva's own INFO lines stay), less
    Flower's deprecation notices, for the duration of the block: every logger level, the filter, transformers'
    verbosity and progress bar and the warning filters are restored afterwards (a command run in-process leaves
    the caller's logging as it was)."""
    from transformers.utils import logging as hf_logging

    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("flwr").addFilter(_not_flower_deprecation)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        ignore_library_deprecations()  # transformers' is_gradient_checkpointing, once per model: not the user's to fix
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            logging.getLogger("flwr").removeFilter(_not_flower_deprecation)
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def run_simulation(
    cfg: FederatedConfig, task_factory: TaskFactory = default_task, num_cpus: int = 2, checkpoint: Optional[str] = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """The same apps under Flower's simulation engine (Ray); one worker per CPU, one thread each.
    The server runs in this process: ``checkpoint`` as in :func:`giva.federated.server_app.run_server`.
    Data too small for the run is refused before Ray starts (the ServerApp checks again, as under ``flwr run``)."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    # The ServerApp's own check runs only once Ray has started; the server's task_factory(cfg) call then finds this
    # task again (default_task caches it), so the data is read once in this process.
    check_data(task_factory(cfg), cfg)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the Ray workers
    results: list[dict[str, Any]] = []
    server = make_server_app(cfg, task_factory, sink=results.append, checkpoint=checkpoint)
    client = make_client_app(task_factory, cfg)
    init_args: dict[str, Any] = {"num_cpus": num_cpus}
    if quiet:  # the workers' own log lines stay in Ray's session folder
        init_args.update(log_to_driver=False, logging_level=logging.WARNING)
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}
    flwr_run_simulation(server, client, num_supernodes=cfg.clients, backend_config=backend)
    if not results:
        raise RuntimeError("the Flower simulation ended without results; its log above says why")
    return results[0]


def run_federated(
    cfg: FederatedConfig, engine: str = "inprocess", task_factory: TaskFactory = default_task,
    checkpoint: Optional[str] = None, quiet: bool = False,
) -> dict[str, Any]:
    """One federated run on ``engine``; returns the results dict (see :func:`giva.federated.server_app.run_server`).

    ``checkpoint``: resume from / save to this file after every round (either engine: the server runs here).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "simulation":
        results = run_simulation(cfg, task_factory, checkpoint=checkpoint, quiet=quiet)
    else:
        results, _ = run_inprocess(cfg, task_factory, checkpoint=checkpoint)
    results["engine"] = engine
    return results


def run_centralised(
    cfg: FederatedConfig, task_factory: TaskFactory = default_task, checkpoint: Optional[str] = None,
    eval_every: int = 1,
) -> dict[str, Any]:
    """GiVA trained in one process on the pooled shards with the federated run's total steps.

    Initialisation is ``giva.initialize`` (dense gradient) over ``clients x num_batches`` pooled
    calibration batches; training takes ``rounds x clients x local_steps`` AdamW steps with a linear
    decay; accuracy is recorded every ``clients x local_steps`` steps (one federated round's worth).
    ``checkpoint``: saved every such round (model, optimizer, scheduler, results), resumed from if it exists.
    ``eval_every``: score every that many rounds (and the last); the others have accuracy None.
    """
    from ..finetune import parameter_groups
    from ..init import initialize

    start = time.perf_counter()
    cfg = replace(cfg, method="giva")
    task = task_factory(cfg)
    if not hasattr(task, "pooled_batches"):
        raise ValueError("the centralised baseline needs a task with pooled_batches()")
    model = build_model(task, cfg)
    calibration = task.pooled_batches(round_index=-1)
    initialize(model, [next(calibration) for _ in range(cfg.clients * cfg.num_batches)],
               num_batches=cfg.clients * cfg.num_batches, progress=False)
    test = task.test_batches()
    per_round = cfg.clients * cfg.local_steps
    total = cfg.rounds * per_round
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.peak_lr, None, 0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = torch.load(checkpoint, weights_only=False) if checkpoint and Path(checkpoint).exists() else None
    if saved is not None:
        if not cfg.same_run(saved["config"]):
            raise ValueError(f"checkpoint {checkpoint} is of another run config; delete it or use another output folder")
        load_trainable_state(model, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rounds, elapsed = saved["rounds"], saved["seconds"]
        logger.info("centralised: resuming after round %d from %s", len(rounds) - 1, checkpoint)
    else:
        rounds, elapsed = [{"round": 0, "accuracy": accuracy(model, test)}], 0.0
    done = (len(rounds) - 1) * per_round
    batches = task.pooled_batches(round_index=0, skip=done)
    model.train()
    devices = tuple({p.device for p in params})
    with torch.random.fork_rng(devices=cuda_indices(devices)):  # dropout reseeded every round: a resumed run continues exactly
        for step in range(done + 1, total + 1):
            if (step - 1) % per_round == 0:
                seed_devices(client_seed(cfg.seed, (step - 1) // per_round + 1, CENTRAL_PARTITION), devices)
            loss = model(**next(batches)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % per_round == 0:
                index = step // per_round
                scored = index % eval_every == 0 or index == cfg.rounds
                model.eval()
                rounds.append({"round": index, "accuracy": accuracy(model, test) if scored else None, "steps": step})
                logger.info("centralised round %d: accuracy %s", index, rounds[-1]["accuracy"])
                model.train()
                if checkpoint:
                    write_checkpoint(checkpoint, {
                        "config": asdict(cfg), "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rounds": rounds,
                        "seconds": elapsed + time.perf_counter() - start})
    model.eval()
    return {"config": asdict(cfg), "method": "giva-centralised", "rounds": rounds, "steps": total,
            "seconds": elapsed + time.perf_counter() - start}


def wire_sizes(cfg: FederatedConfig, task_factory: TaskFactory = default_task) -> dict[str, Any]:
    """Bytes per client of every message ``cfg`` would exchange, without training: the same Flower messages
    built from the real model's layouts, filled with random values (so no chunk is de-duplicated, as after
    training). Per client: the setup messages (down / up) and one training round (down / up)."""
    from .server_app import STATISTICS_REPLY_METRICS
    from .statistics import bases_layout, dense_layout, matrix_layout, read_bases, sketch_session, sums_layout
    from .task import projection_state, trainable_state

    generator = torch.Generator().manual_seed(0)

    def filled(layout: list, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {name: torch.randn(shape, generator=generator, dtype=dtype) for name, shape in layout}

    def pair(down: RecordDict, up: RecordDict, message_type: str) -> tuple[int, int]:
        message = Message(down, dst_node_id=1000, message_type=message_type, group_id="sizes")
        return messages.message_bytes(message), messages.message_bytes(Message(up, reply_to=message))

    task = task_factory(cfg)
    model = build_model(task, cfg)
    setup: list[tuple[int, int]] = []
    with _ServerIdentity():
        if cfg.method == "giva":
            common = {"mode": cfg.init_mode, "num-batches": cfg.num_batches, "passes": cfg.passes,
                      "oversampling": cfg.oversample, "sketch-dtype": cfg.sketch_dtype}
            metrics = {key: 1 for key in STATISTICS_REPLY_METRICS}
            if cfg.init_mode == "dense":
                setup.append(pair(messages.make_content(config=common),
                                  messages.make_content(filled(dense_layout(model), torch.float64), metrics=metrics),
                                  messages.STATISTICS))
            else:
                session = sketch_session(model, cfg.passes, cfg.sketch_oversampling)
                dtype = cfg.transport_dtype
                for index in range(cfg.passes):
                    kind = "gt" if index % 2 == 0 else "g"
                    matrices = None if index == 0 else filled(matrix_layout(session, kind), dtype)
                    setup.append(pair(
                        messages.make_content(matrices, config={**common, "pass-index": index, "kind": kind}),
                        messages.make_content(filled(sums_layout(session, kind), dtype), metrics=metrics),
                        messages.STATISTICS))
            a_dtype = next(iter(read_bases(model).values())).dtype  # A travels as the model stores it
            setup.append(pair(messages.make_content(filled(bases_layout(model), a_dtype)),
                              messages.make_content(metrics={"num-stored": 1}), messages.BASES))
        elif cfg.method == "vera" and cfg.vera_projections:
            setup.append(pair(messages.make_content(projection_state(model)),
                              messages.make_content(metrics={"num-stored": 1}), messages.BASES))
        layout = messages.layout_of(trainable_state(model))
        train = pair(messages.make_content(filled(layout), config={"round": 1, "local-steps": cfg.local_steps, "lr": 0.1}),
                     messages.make_content(filled(layout), metrics={"num-examples": 1, "train-loss": 0.5}),
                     messages.TRAIN)
    trainable = sum(torch.Size(shape).numel() for _, shape in layout)
    return {"method": cfg.method, "setup": setup, "setup_down": sum(d for d, _ in setup),
            "setup_up": sum(u for _, u in setup), "round_down": train[0], "round_up": train[1],
            "trainable_parameters": trainable}


def bytes_table(cfg: FederatedConfig, rounds: list[int], task_factory: TaskFactory = default_task) -> tuple[str, list]:
    """Markdown table of :func:`wire_sizes` for GiVA (sketch and dense setup), LoRA and VeRA (with / without
    projections): per client per round, setup total, and totals for ``cfg.clients`` clients after each of ``rounds``."""
    rows = []
    session = sketch_session(build_model(task_factory(cfg), replace(cfg, method="giva")), cfg.passes,
                             cfg.sketch_oversampling)
    sketch = f"{cfg.passes} passes, l={session.width(next(iter(session.targets)))}, sent as {cfg.sketch_dtype}"
    other = "bfloat16" if cfg.sketch_dtype == "float32" else "float32"
    variants = [("giva", {"init_mode": "sketch"}, f"giva r={cfg.giva_r}, sketch setup ({sketch})"),
                ("giva", {"init_mode": "sketch", "bases_dtype": "bfloat16"},
                 f"giva r={cfg.giva_r}, sketch setup ({sketch}), A stored and sent as bfloat16"),
                ("giva", {"init_mode": "sketch", "sketch_dtype": other},
                 f"giva r={cfg.giva_r}, sketch setup ({cfg.passes} passes, same l, sent as {other})"),
                ("giva", {"init_mode": "sketch", "passes": 2, "sketch_dtype": "bfloat16"},
                 f"giva r={cfg.giva_r}, sketch setup (2 passes, same l, sent as bfloat16)"),
                ("giva", {"init_mode": "sketch", "passes": 2, "oversample": 8, "sketch_dtype": "float32"},
                 f"giva r={cfg.giva_r}, sketch setup (before: 2 passes, l={cfg.giva_r + 8}, float32)"),
                ("giva", {"init_mode": "dense"}, f"giva r={cfg.giva_r}, dense setup"),
                ("lora", {}, f"lora r={cfg.lora_r}"),
                ("vera", {"vera_projections": True}, f"vera r={cfg.vera_r}, projections sent"),
                ("vera", {"vera_projections": False}, f"vera r={cfg.vera_r}, seed only")]
    for method, overrides, label in variants:
        sizes = wire_sizes(replace(cfg, method=method, **overrides), task_factory)
        per_round = cfg.clients * (sizes["round_down"] + sizes["round_up"])
        setup_total = cfg.clients * (sizes["setup_down"] + sizes["setup_up"])
        rows.append({**sizes, "label": label, "setup_total": setup_total,
                     "totals": {r: setup_total + r * per_round for r in rounds}})
    lora = next(r for r in rows if r["method"] == "lora")
    head = ("| method | trainable | down / client / round | up / client / round | setup, per client (down + up) | "
            + " | ".join(f"total after {r} rounds ({cfg.clients} clients)" for r in rounds) + " |")
    lines = [head, "|" + "---|" * (5 + len(rounds))]
    for row in rows:
        totals = " | ".join(f"{_mb(row['totals'][r])} MB (LoRA / this: {lora['totals'][r] / row['totals'][r]:.1f})"
                            if row is not lora else f"{_mb(row['totals'][r])} MB" for r in rounds)
        lines.append(f"| {row['label']} | {row['trainable_parameters']:,} | {row['round_down'] / 1e3:.1f} kB | "
                     f"{row['round_up'] / 1e3:.1f} kB | {(row['setup_down'] + row['setup_up']) / 1e6:.3f} MB | {totals} |")
    return "\n".join(lines), rows


def sketch_accuracy(
    base: FederatedConfig, settings: list[tuple[int, int, str]], task_factory: TaskFactory = default_task
) -> dict[str, Any]:
    """Bases of the federated sketch setup against the dense path, for each ``(passes, oversample, sketch_dtype)``.

    Each setting runs the real setup exchanges (in-process grid, ``base.clients`` clients, their calibration
    batches) and compares every block's ``A`` with the dense path's (the exact SVD of the mean gradient
    over the union of the same batches): the mean top-min(r, rank) principal cosine of each block, then the
    mean and the minimum over blocks (rank: singular values above 1e-3 of the largest). Bytes are those of
    the setup messages of one client (down + up).
    """
    from .server_app import setup_giva, wait_for_nodes
    from .statistics import block_specs, dense_statistics, read_bases

    task = task_factory(base)
    model = build_model(task, replace(base, method="giva"))
    union = [b for p in range(base.clients) for b in task.calibration_batches(p, base.clients, base.num_batches)]
    start = time.perf_counter()
    stats, count = dense_statistics(model, union)
    exact = {}
    for key, spec in block_specs(model).items():
        _, s, vh = torch.linalg.svd((stats[key] / count).float(), full_matrices=False)
        exact[key] = (vh, int((s > s[0] * 1e-3).sum()))
    dense_seconds = time.perf_counter() - start
    rows = []
    for passes, oversample, dtype in settings:
        cfg = replace(base, method="giva", init_mode="sketch", passes=passes, oversample=oversample, sketch_dtype=dtype)
        grid = InProcessGrid(make_client_app(task_factory, cfg), cfg.clients)
        fresh = build_model(task, cfg)
        start = time.perf_counter()
        with _ServerIdentity():
            traffic, _ = setup_giva(grid, wait_for_nodes(grid, cfg.clients), fresh, cfg)
        seconds = time.perf_counter() - start
        bases = read_bases(fresh)
        cosines = []
        for key, (vh, rank) in exact.items():
            k = min(cfg.giva_r, rank)
            cosines.append(float(torch.linalg.svdvals(vh[:k].double() @ bases[key][:k].double().mT).clamp(max=1).mean()))
        session = sketch_session(fresh, passes, cfg.sketch_oversampling)
        rows.append({"passes": passes, "oversample": oversample, "sketch_dtype": dtype,
                     "l": session.width(next(iter(session.targets))),
                     "mean_cos": sum(cosines) / len(cosines), "min_cos": min(cosines), "blocks": len(cosines),
                     "setup_bytes_per_client": sum(t.down[0] + t.up[0] for t in traffic),
                     "setup_messages": [{"down": t.down[0], "up": t.up[0]} for t in traffic],
                     "seconds": seconds})
        logger.info("sketch passes=%d l=%d %s: mean cos %.4f, min %.4f, %.3f MB per client", passes, rows[-1]["l"], dtype,
                    rows[-1]["mean_cos"], rows[-1]["min_cos"], rows[-1]["setup_bytes_per_client"] / 1e6)
    return {"config": asdict(base), "calibration_examples": count, "dense_seconds": dense_seconds, "rows": rows}


def sketch_table(result: dict[str, Any]) -> str:
    lines = ["| passes | l | sums / test matrices sent as | mean cos A | min cos A | setup per client (MB, down + up) "
             "| messages (down / up kB) |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        msgs = ", ".join(f"{m['down'] / 1e3:.0f} / {m['up'] / 1e3:.0f}" for m in row["setup_messages"])
        lines.append(f"| {row['passes']} | {row['l']} | {row['sketch_dtype']} | {row['mean_cos']:.4f} | "
                     f"{row['min_cos']:.4f} | {row['setup_bytes_per_client'] / 1e6:.3f} | {msgs} |")
    return "\n".join(lines)


SAMPLING_Z = 1.96  # the normal quantile of a two-sided 95 % interval


def sampling_half_width(accuracy: float, sentences: int) -> float:
    """Half-width, in points, of the 95 % normal interval of an accuracy measured on ``sentences`` held-out
    sentences: the test set's binomial sampling alone (one run, one seed: training noise is not in it). The one
    definition of "sampling error" the federated docs use."""
    return 100 * SAMPLING_Z * math.sqrt(accuracy * (1 - accuracy) / sentences)


def sampling_rows(folder: str) -> list[dict[str, Any]]:
    """The final accuracy of every run in ``folder/*/results.json`` (the centralised baseline included) with its
    95 % half-width (:func:`sampling_half_width`); files without runs (the SuperLink record) are skipped."""
    rows = []
    for path in sorted(Path(folder).glob("*/results.json")):
        saved = json.loads(path.read_text())
        runs = dict(saved.get("runs", {}))
        if saved.get("centralised"):
            runs["giva-centralised"] = saved["centralised"]
        for method, run in runs.items():
            accuracy, sentences = run["rounds"][-1]["accuracy"], run["config"]["test_size"]
            rows.append({"results": path.parent.name, "method": method, "test_sentences": sentences,
                         "final_accuracy": accuracy, "half_width_points": sampling_half_width(accuracy, sentences)})
    return rows


def sampling_differences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GiVA's final accuracy minus each other method's in the same results folder, in points, with the 95 %
    half-width of a difference of two independent sampling errors, ``sqrt(h_giva**2 + h_other**2)``. The runs score
    the same sentences, so their errors are not independent: without per-sentence answers in results.json this is the
    interval that can be formed, wider than a paired one where both methods get the same sentences wrong."""
    giva = {r["results"]: r for r in rows if r["method"] == "giva"}
    out = []
    for row in rows:
        own = giva.get(row["results"])
        if own is None or row is own:
            continue
        estimate = 100 * (own["final_accuracy"] - row["final_accuracy"])
        half = math.hypot(own["half_width_points"], row["half_width_points"])
        out.append({"results": row["results"], "versus": row["method"], "difference_points": estimate,
                    "low": estimate - half, "high": estimate + half})
    return out


def sampling_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| results | method | test sentences | final accuracy | 95 % sampling half-width (points) |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r['results']} | {r['method']} | {r['test_sentences']} | {100 * r['final_accuracy']:.2f}% | "
              f"±{r['half_width_points']:.2f} |" for r in rows]
    lines += ["", "GiVA minus each other method of the same results folder (one run each; the 95 % interval of a difference "
              "of two independent sampling errors, sqrt(h1^2 + h2^2)):", "",
              "| results | GiVA minus | difference (points) [95 %] |", "|---|---|---:|"]
    lines += [f"| {d['results']} | {d['versus']} | {d['difference_points']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] |"
              for d in sampling_differences(rows)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- reports


def summarise(run: dict[str, Any], label: str, setup_bytes: Optional[int] = None) -> dict[str, Any]:
    """Per-run figures: bytes per client per round, setup and total bytes, accuracy per round, cumulative MB."""
    setup = run["setup_bytes"] if setup_bytes is None else setup_bytes
    rounds = run["rounds"]
    train = [r["traffic"] for r in rounds[1:]]
    clients = run["config"]["clients"]
    cumulative = [setup]
    for t in train:
        cumulative.append(cumulative[-1] + t["total"])
    return {
        "label": label,
        "method": run["config"]["method"],
        "split": run["config"]["split"],
        "trainable_parameters": run["trainable_parameters"],
        # Mean over rounds and clients: round 1's download can be smaller (Flower sends identical chunks once,
        # and freshly initialised vectors are mostly identical values).
        "down_per_client_round": sum(sum(t["down"]) for t in train) / max(1, clients * len(train)),
        "up_per_client_round": sum(sum(t["up"]) for t in train) / max(1, clients * len(train)),
        "setup_bytes": setup,
        "setup_per_client": setup / clients,
        "total_bytes": cumulative[-1],
        "cumulative_bytes": cumulative,
        "accuracy": [r["accuracy"] for r in rounds],
        "final_accuracy": rounds[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rounds[1:]) if len(rounds) > 1 else rounds[0]["accuracy"],
        "seconds": run.get("seconds"),
    }


def to_target(summary: dict[str, Any], target: float) -> tuple[Optional[int], Optional[int]]:
    """First round whose accuracy is >= ``target`` and the total bytes sent up to its end (None: never)."""
    for index, acc in enumerate(summary["accuracy"]):
        if index > 0 and acc >= target:
            return index, summary["cumulative_bytes"][index]
    return None, None


def rounds_to_fewer_bytes(summary: dict[str, Any], reference: dict[str, Any], factor: float = 10.0
                          ) -> tuple[Optional[int], bool]:
    """The first round after which ``summary``'s cumulative bytes (setup included) are ``factor`` times below
    ``reference``'s, and whether that round was measured (else it is extrapolated from each run's setup
    bytes and its mean measured bytes per round). ``(None, False)``: never (a round of ``summary`` costs
    more than ``1 / factor`` of a round of ``reference``)."""
    ours, theirs = summary["cumulative_bytes"], reference["cumulative_bytes"]
    for index in range(1, min(len(ours), len(theirs))):
        if factor * ours[index] <= theirs[index]:
            return index, True
    if len(ours) < 2 or len(theirs) < 2:
        return None, False
    per_ours = (ours[-1] - ours[0]) / (len(ours) - 1)
    per_theirs = (theirs[-1] - theirs[0]) / (len(theirs) - 1)
    if per_theirs <= factor * per_ours:
        return None, False
    # factor * (S + n g) <= S' + n g'  <=>  n >= (factor S - S') / (g' - factor g)
    return max(1, math.ceil((factor * ours[0] - theirs[0]) / (per_theirs - factor * per_ours))), False


def _mb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}"


def markdown_table(summaries: list[dict[str, Any]], targets: list[float], centralised: Optional[dict] = None) -> str:
    """The results table (bytes in MB = 10^6 bytes, accuracy on the held-out split)."""
    lora = next((s for s in summaries if s["method"] == "lora"), None)
    head = ("| method | split | trainable | down / client / round (MB) | up / client / round (MB) | setup total (MB) "
            "| total (MB) | final acc. | best acc. | " + " | ".join(f"rounds (MB) to {t:.1%}" for t in targets)
            + " | rounds until 10x fewer bytes than LoRA |")
    lines = [head, "|" + "---|" * (10 + len(targets))]
    for s in summaries:
        reach = []
        for t in targets:
            r, b = to_target(s, t)
            reach.append("not reached" if r is None else f"{r} ({_mb(b)})")
        tenfold = "-"
        if lora is not None and s is not lora:
            n, measured = rounds_to_fewer_bytes(s, lora)
            tenfold = "never" if n is None else f"{n}" + ("" if measured else " (extrapolated)")
        lines.append(
            f"| {s['label']} | {s['split']} | {s['trainable_parameters']:,} | {_mb(s['down_per_client_round'])} | "
            f"{_mb(s['up_per_client_round'])} | {_mb(s['setup_bytes'])} | {_mb(s['total_bytes'])} | "
            f"{s['final_accuracy']:.2%} | {s['best_accuracy']:.2%} | " + " | ".join(reach) + f" | {tenfold} |"
        )
    if centralised is not None:
        accs = [r["accuracy"] for r in centralised["rounds"]]
        reach = [next((f"{i} (-)" for i, a in enumerate(accs) if i > 0 and a is not None and a >= t), "not reached")
                 for t in targets]
        accs = [a for a in accs if a is not None]
        lines.append(
            f"| giva, centralised ({centralised['steps']} steps on the pooled data) | - | - | - | - | - | - | "
            f"{accs[-1]:.2%} | {max(accs[1:] or accs):.2%} | " + " | ".join(reach) + " | - |"
        )
    return "\n".join(lines)


def plot_accuracy_vs_mb(summaries: list[dict[str, Any]], path: str, title: str = "") -> None:
    """Accuracy after each round against the cumulative megabytes sent (setup included), log x-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summaries:
        # A log axis cannot show 0 bytes: points before anything was sent (LoRA's round 0) are left out.
        points = [(b / 1e6, 100 * a) for b, a in zip(s["cumulative_bytes"], s["accuracy"]) if b > 0]
        ax.plot(*zip(*points), marker="o", markersize=3, label=f"{s['label']} ({s['split']})")
    ax.set_xscale("log")
    ax.set_xlabel("total megabytes sent, all clients, up + down (setup included; log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_comparison(
    base: FederatedConfig,
    output_dir: str,
    methods: tuple[str, ...] = ("giva", "lora", "vera"),
    engine: str = "inprocess",
    centralised: bool = True,
    targets: Optional[list[float]] = None,
    task_factory: TaskFactory = default_task,
    checkpoint_dir: Optional[str] = None,
    central_eval_every: int = 1,
    lrs: Optional[dict[str, float]] = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Every method on ``base`` (same shards, rounds, steps), VeRA's two setups, and the centralised
    GiVA baseline; writes ``results.json``, ``results.md`` and ``accuracy_vs_mb.png`` to ``output_dir``.

    ``lrs``: a peak LR per method (``{"giva": 0.02}``), else ``base.lr`` or the method's default; the
    centralised baseline trains at GiVA's.

    VeRA without projections is the VeRA run's training with its setup message left out: the clients
    regenerate the very same projections from the PRNG key, so only the setup bytes differ.
    ``quiet``: Ray's workers do not print to this process (see :func:`quiet_libraries` for the rest).
    ``checkpoint_dir``: each run saves ``<method>.pt`` there after every round and a
    repeated call goes on from there.
    """
    def checkpoint(name: str) -> Optional[str]:
        return str(Path(checkpoint_dir) / f"{name}.pt") if checkpoint_dir else None

    lrs = dict(lrs or {})
    unknown = sorted(set(lrs) - set(METHODS))
    if unknown:
        raise ValueError(f"lrs: unknown method(s) {unknown}; expected some of {list(METHODS)}")
    runs: dict[str, Any] = {}
    summaries = []
    for method in methods:
        cfg = replace(base, method=method, vera_projections=True, lr=lrs.get(method, base.lr))
        logger.info("federated %s: %d clients, %d rounds, %s", method, cfg.clients, cfg.rounds, cfg.split)
        runs[method] = run_federated(cfg, engine, task_factory, checkpoint=checkpoint(method), quiet=quiet)
        label = {"giva": f"giva r={cfg.giva_r} ({cfg.init_mode})", "lora": f"lora r={cfg.lora_r}",
                 "vera": f"vera r={cfg.vera_r}, projections sent"}[method]
        summaries.append(summarise(runs[method], label))
        if method == "vera":
            summaries.append(summarise(runs[method], f"vera r={cfg.vera_r}, seed only", setup_bytes=0))
        write_json({"runs": runs}, str(Path(output_dir) / "results.json"))  # partial results survive a crash
    central = None
    if centralised and "giva" in methods:
        central = run_centralised(replace(base, lr=lrs.get("giva", base.lr)), task_factory, checkpoint("centralised"),
                                  central_eval_every)
    write_json({"runs": runs, "centralised": central}, str(Path(output_dir) / "results.json"))
    return write_report(output_dir, runs, summaries, central, targets,
                        f"{base.clients} clients, {base.rounds} rounds x {base.local_steps} local steps, {base.split}")


def rounds_table(summaries: list[dict[str, Any]], centralised: Optional[dict] = None) -> str:
    """Accuracy (%) and cumulative MB sent (setup included) after every round, one row pair per run."""
    rounds = max(len(s["accuracy"]) for s in summaries)
    pad = [""] * rounds
    lines = ["| round | " + " | ".join(str(i) for i in range(rounds)) + " |", "|---|" + "---|" * rounds]
    for s in summaries:
        acc = [f"{100 * a:.2f}" for a in s["accuracy"]]
        lines.append(f"| {s['label']}: accuracy % | " + " | ".join((acc + pad)[:rounds]) + " |")
        mb = [_mb(b) for b in s["cumulative_bytes"]]
        lines.append(f"| {s['label']}: MB sent so far | " + " | ".join((mb + pad)[:rounds]) + " |")
    if centralised is not None:
        acc = ["-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}" for r in centralised["rounds"]]
        lines.append("| giva, centralised: accuracy % | " + " | ".join((acc + pad)[:rounds]) + " |")
    return "\n".join(lines)


def write_report(output_dir: str, runs: dict[str, Any], summaries: list[dict[str, Any]],
                 central: Optional[dict[str, Any]], targets: Optional[list[float]], title: str) -> dict[str, Any]:
    """results.json, results.md and accuracy_vs_mb.png of finished or checkpointed runs. ``targets``
    (accuracies to reach) default to 70 %, 75 % and LoRA's last accuracy minus one point."""
    if targets is None:
        targets = [0.70, 0.75]
        if "lora" in runs:
            targets.append(math.floor(1000 * (runs["lora"]["rounds"][-1]["accuracy"] - 0.01)) / 1000)
    table = markdown_table(summaries, targets, central)
    out = {"runs": runs, "summaries": summaries, "centralised": central, "targets": targets, "table": table,
           "headline": headline(summaries, central), "versions": _versions()}
    write_json(out, str(Path(output_dir) / "results.json"))
    Path(output_dir, "results.md").write_text(f"{table}\n\n{rounds_table(summaries, central)}\n")
    plot_accuracy_vs_mb(summaries, str(Path(output_dir) / "accuracy_vs_mb.png"), title)
    return out


def report_checkpoints(output_dir: str, targets: Optional[list[float]] = None) -> dict[str, Any]:
    """The table, headline and plot of whatever runs ``OUTPUT_DIR/.checkpoints`` holds, finished or not
    (a run cut by its time limit reports the rounds it finished; ``complete`` says which)."""
    folder = Path(output_dir) / ".checkpoints"
    runs: dict[str, Any] = {}
    summaries = []
    for method in ("giva", "lora", "vera"):
        path = folder / f"{method}.pt"
        if not path.exists():
            continue
        saved = torch.load(path, weights_only=False)
        cfg = saved["config"]
        runs[method] = {"config": cfg, "setup": saved["setup"], "setup_info": saved["setup_info"],
                        "setup_bytes": sum(sum(t["down"]) + sum(t["up"]) for t in saved["setup"]),
                        "rounds": saved["rounds"], "trainable_tensors": len(saved["trainable"]),
                        "trainable_parameters": sum(t.numel() for t in saved["trainable"].values()),
                        "seconds": saved["seconds"], "complete": len(saved["rounds"]) == cfg["rounds"] + 1}
        label = {"giva": f"giva r={cfg['giva_r']} ({cfg['init_mode']})", "lora": f"lora r={cfg['lora_r']}",
                 "vera": f"vera r={cfg['vera_r']}, projections sent"}[method]
        stopped = "" if runs[method]["complete"] else f", stopped after round {len(saved['rounds']) - 1}"
        summaries.append(summarise(runs[method], label + stopped))
        if method == "vera":  # as run_comparison: the same run without its setup message
            summaries.append(summarise(runs[method], f"vera r={cfg['vera_r']}, seed only{stopped}", setup_bytes=0))
    central = None
    if (folder / "centralised.pt").exists():
        saved = torch.load(folder / "centralised.pt", weights_only=False)
        per_round = saved["config"]["clients"] * saved["config"]["local_steps"]
        central = {"config": saved["config"], "method": "giva-centralised", "rounds": saved["rounds"],
                   "steps": (len(saved["rounds"]) - 1) * per_round, "seconds": saved["seconds"],
                   "complete": len(saved["rounds"]) == saved["config"]["rounds"] + 1}
        if central["rounds"][-1]["accuracy"] is None:
            central = None  # scored only at its last round, which it did not reach
    if not summaries:
        raise FileNotFoundError(f"no checkpoints in {folder}")
    first = next(iter(runs.values()))["config"]
    return write_report(output_dir, runs, summaries, central, targets,
                        f"{first['clients']} clients, up to {first['rounds']} rounds x {first['local_steps']} local steps, "
                        f"{first['split']}")


def headline(summaries: list[dict[str, Any]], central: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """GiVA against LoRA (accuracy points, total-bytes ratio, setup included) and against centralised GiVA."""
    by_method = {s["method"]: s for s in summaries}
    out: dict[str, Any] = {}
    if "giva" in by_method and "lora" in by_method:
        giva, lora = by_method["giva"], by_method["lora"]
        out["giva_minus_lora_final_points"] = round(100 * (giva["final_accuracy"] - lora["final_accuracy"]), 2)
        out["giva_minus_lora_best_points"] = round(100 * (giva["best_accuracy"] - lora["best_accuracy"]), 2)
        out["lora_over_giva_total_bytes"] = round(lora["total_bytes"] / giva["total_bytes"], 2)
        out["target_met"] = out["giva_minus_lora_final_points"] >= -1.0 and out["lora_over_giva_total_bytes"] >= 10
        rounds, measured = rounds_to_fewer_bytes(giva, lora)
        out["rounds_until_10x_fewer_bytes_than_lora"] = rounds
        out["rounds_until_10x_measured"] = measured
    if "giva" in by_method and central is not None:
        out["giva_federated_minus_centralised_points"] = round(
            100 * (by_method["giva"]["final_accuracy"] - central["rounds"][-1]["accuracy"]), 2)
    return out


def _versions() -> dict[str, str]:
    import flwr
    import peft
    import transformers

    return {"flwr": flwr.__version__, "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__}


__all__ = [
    "ENGINES",
    "InProcessGrid",
    "cached_task",
    "markdown_table",
    "plot_accuracy_vs_mb",
    "run_centralised",
    "run_comparison",
    "run_federated",
    "run_inprocess",
    "run_simulation",
    "summarise",
    "write_json",
]


# The measurements committed under benchmarks/results/federated/ (README, "Federated fine-tuning"):
#   python -m giva.federated.run bytes benchmarks/results/federated
#   python -m giva.federated.run sketch benchmarks/results/federated
#   python -m giva.federated.run accuracy benchmarks/results/federated/iid
#   python -m giva.federated.run label-skew benchmarks/results/federated/label-skew
#   python -m giva.federated.run report OUTPUT_DIR    # the table / plot of the checkpoints there, finished or not
#   python -m giva.federated.run sampling benchmarks/results/federated   # each run's 95 % sampling half-width
#   python -m giva.federated.run bytes benchmarks/results/federated/smollm2 task=causal-lm model=smollm2
#   python -m giva.federated.run accuracy benchmarks/results/federated/smollm2 task=causal-lm model=smollm2 \
#       methods=giva,lora rounds=5 test-size=400 lr-giva=0.02 lr-lora=0.001
# accuracy / label-skew take FederatedConfig overrides (key=value, kebab-case), methods=giva,lora,vera and
# per-method peak LRs lr-giva= / lr-lora= / lr-vera=;
# they keep checkpoints in OUTPUT_DIR/.checkpoints, so a killed run goes on where it stopped when rerun.
BYTES_CONFIG = FederatedConfig(clients=4, rounds=10, test_size=100, max_train_samples=64)
SKETCH_CONFIG = FederatedConfig(clients=4)  # the setup of the accuracy runs: 4 x 4 calibration batches of 16
# (passes, oversample, sketch dtype); oversample -1: the library default max(2r, 32)
SKETCH_SETTINGS = [(3, -1, "float32"), (3, -1, "bfloat16"), (2, -1, "bfloat16"), (2, 8, "float32")]
SKETCH_MIN_MEAN_COSINE = 0.99  # the cheapest setting above this mean principal cosine (vs the dense path) is chosen
ACCURACY_CONFIG = FederatedConfig(clients=4, rounds=10, local_steps=5, split="iid", seed=0)
LABEL_SKEW_CONFIG = replace(ACCURACY_CONFIG, rounds=5, split="label-skew")


def choose_sketch(rows: list[dict[str, Any]], threshold: float = SKETCH_MIN_MEAN_COSINE) -> Optional[dict[str, Any]]:
    """The setting with the fewest setup bytes whose mean principal cosine is >= ``threshold`` (None: none is)."""
    good = [row for row in rows if row["mean_cos"] >= threshold]
    return min(good, key=lambda row: row["setup_bytes_per_client"]) if good else None


def _main(argv: list[str]) -> int:
    from .local_deployment import parse_overrides

    kinds = ("bytes", "sketch", "accuracy", "label-skew", "report", "sampling")
    if len(argv) < 2 or argv[0] not in kinds:
        print(f"usage: python -m giva.federated.run {'|'.join(kinds)} OUTPUT_DIR [key=value ...]")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    kind, output_dir = argv[:2]
    overrides = {k.replace("-", "_"): v for k, v in parse_overrides(argv[2:]).items()}
    if kind == "bytes":
        rounds = [1, 10, 30, 100]
        cfg = replace(BYTES_CONFIG, **overrides)
        table, rows = bytes_table(cfg, rounds)
        write_json({"config": asdict(cfg), "rounds": rounds, "rows": rows, "table": table,
                    "versions": _versions()}, str(Path(output_dir) / "bytes.json"))
        Path(output_dir, "bytes.md").write_text(table + "\n")
        print(table)
    elif kind == "sampling":
        rows = sampling_rows(output_dir)
        table = sampling_table(rows)
        write_json({"z": SAMPLING_Z, "rows": rows, "differences": sampling_differences(rows), "table": table},
                   str(Path(output_dir) / "sampling.json"))
        Path(output_dir, "sampling.md").write_text(table + "\n")
        print(table)
    elif kind == "report":
        try:
            out = report_checkpoints(output_dir)
        except FileNotFoundError as err:  # report_checkpoints decides what counts as a run's checkpoint
            print(f"report: {err} (a run's checkpoints are local and not committed; run the comparison there first)",
                  file=sys.stderr)
            return 2
        print(out["table"])
        print(out["headline"])
    elif kind == "sketch":
        result = sketch_accuracy(replace(SKETCH_CONFIG, **overrides), SKETCH_SETTINGS)
        result["choice"] = choose_sketch(result["rows"])
        table = sketch_table(result)
        write_json({**result, "threshold": SKETCH_MIN_MEAN_COSINE, "table": table, "versions": _versions()},
                   str(Path(output_dir) / "sketch.json"))
        Path(output_dir, "sketch.md").write_text(table + "\n")
        print(table)
        print("chosen:", result["choice"])
    else:
        methods = tuple(str(overrides.pop("methods", "giva,lora")).split(","))
        lrs = {key[3:]: float(overrides.pop(key)) for key in list(overrides) if key.startswith("lr_")}  # lr-giva=0.02
        cfg = replace(ACCURACY_CONFIG if kind == "accuracy" else LABEL_SKEW_CONFIG, **overrides)
        out = run_comparison(cfg, output_dir, methods=methods, engine="inprocess", centralised=kind == "accuracy",
                             checkpoint_dir=str(Path(output_dir) / ".checkpoints"), central_eval_every=cfg.rounds,
                             lrs=lrs)
        print(out["table"])
        print(out["headline"])
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
