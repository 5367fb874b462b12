"""Federated GiVA on Flower: the setup round agrees on the one-process bases, FedAvg is the
example-weighted mean, and the reported bytes are the serialized messages' sizes.

Runs the real ServerApp / ClientApp handlers with Flower's Message objects through an in-process
grid (every message is deflated to bytes and inflated back); no Ray, tiny seeded BERT, 3 clients.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402

from giva.federated import messages  # noqa: E402
from giva.federated.client_app import STATE_KEY, make_client_app  # noqa: E402
from giva.federated.run import (  # noqa: E402
    InProcessGrid,
    _ServerIdentity,
    rounds_to_fewer_bytes,
    run_centralised,
    run_comparison,
    run_inprocess,
    wire_sizes,
)
from giva.federated.server_app import run_server  # noqa: E402
from giva.federated.statistics import (  # noqa: E402
    apply_bases,
    bases_layout,
    block_specs,
    one_process_dense_bases,
    read_bases,
)
from giva.federated.task import (  # noqa: E402
    CANDIDATES,
    FederatedConfig,
    accuracy,
    build_model,
    client_seed,
    fedavg,
    local_train,
    peft_config,
    shard_indices,
    trainable_state,
)
from giva.init import GradientInitError, initialize  # noqa: E402
from giva.init.accumulate import GROWTH_INTERVAL  # noqa: E402
from tiny_models import VOCAB, text_batches, tiny_bert, tiny_llama  # noqa: E402

CLIENTS = 3
TARGETS = "query,value,intermediate.dense"


class TinyTask:
    """Token batches on a tiny BERT; client ``p`` holds ``4 * (p + 1)`` batches of 4 (unequal shards)."""

    num_labels = 2

    def __init__(self, cfg: FederatedConfig) -> None:
        self.cfg = cfg

    def base_model(self) -> torch.nn.Module:
        return tiny_bert(seed=self.cfg.seed)

    def shard_size(self, partition: int, num_partitions: int) -> int:
        return 16 * (partition + 1)

    def _shard(self, partition: int) -> list[dict]:
        return text_batches(n=4 * (partition + 1), batch=4, length=8, seed=100 + partition)

    def train_batches(self, partition: int, num_partitions: int, round_index: int):
        shard = self._shard(partition)
        return iter(shard[round_index % len(shard) :] + shard * 4)

    def calibration_batches(self, partition: int, num_partitions: int, num_batches: int) -> list[dict]:
        return self._shard(partition)[:num_batches]

    def test_batches(self) -> list[dict]:
        return text_batches(n=2, batch=8, length=8, seed=999)


def config(**overrides) -> FederatedConfig:
    base = dict(clients=CLIENTS, rounds=2, local_steps=2, giva_r=4, vera_r=8, lora_r=2, target_modules=TARGETS,
                num_batches=2, oversample=4, batch_size=4)
    return FederatedConfig(**{**base, **overrides})


def union_batches(cfg: FederatedConfig, order: list[int]) -> list[dict]:
    task = TinyTask(cfg)
    return [b for p in order for b in task.calibration_batches(p, CLIENTS, cfg.num_batches)]


def client_bases(grid, cfg: FederatedConfig) -> list[dict[str, torch.Tensor]]:
    layout = bases_layout(build_model(TinyTask(cfg), cfg))
    return [messages.record_tensors(ctx.state[STATE_KEY], layout) for ctx in grid.contexts.values()]


def train_layout(cfg: FederatedConfig):
    return messages.layout_of(trainable_state(build_model(TinyTask(cfg), cfg)))


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of two orthonormal-row matrices."""
    return torch.linalg.svdvals(a.double() @ b.double().mT)


@pytest.fixture(scope="module")
def dense_run():
    cfg = config(init_mode="dense")
    return cfg, *run_inprocess(cfg, TinyTask, keep_log=True)


@pytest.fixture(scope="module")
def sketch_run():
    cfg = config(init_mode="sketch", rounds=1, local_steps=1, passes=3, sketch_dtype="float32")
    return cfg, *run_inprocess(cfg, TinyTask, keep_log=True)


def test_dense_setup_gives_every_client_the_one_process_bases_bit_for_bit(dense_run):
    cfg, results, grid = dense_run
    held = client_bases(grid, cfg)
    assert len(held) == CLIENTS
    for other in held[1:]:
        assert other.keys() == held[0].keys()
        assert all(torch.equal(other[k], held[0][k]) for k in held[0])
    # One process over the union of the shards, in two different orders: the same bits.
    model = build_model(TinyTask(cfg), cfg)
    for order in ([0, 1, 2], [2, 0, 1]):
        reference = one_process_dense_bases(model, union_batches(cfg, order), peft_config(cfg))
        assert reference.keys() == held[0].keys()
        assert all(torch.equal(reference[k], held[0][k]) for k in reference)
    # ... and the library's own single-process initialisation over the same batches (a mean of equal-size
    # batch gradients in float32, so equal up to rounding).
    initialize(model, union_batches(cfg, [0, 1, 2]), num_batches=CLIENTS * cfg.num_batches, progress=False,
               mode="exact")
    library = read_bases(model)
    for key in held[0]:
        assert principal_cosines(library[key], held[0][key]).min() > 0.9999
    assert results["setup_info"] == {"mode": "dense", "calibration_examples": 4 * cfg.num_batches * CLIENTS,
                                     "blocks": len(held[0]), "passes": 1}


def test_sketch_setup_matches_a_one_process_sketch_of_the_union(sketch_run):
    cfg, results, grid = sketch_run
    held = client_bases(grid, cfg)
    for other in held[1:]:
        assert all(torch.equal(other[k], held[0][k]) for k in held[0])
    # The library's single-process sketched initialisation (giva.init) over the union of the shards.
    model = build_model(TinyTask(cfg), cfg)
    initialize(model, union_batches(cfg, [0, 1, 2]), num_batches=CLIENTS * cfg.num_batches, progress=False,
               mode="sketch", passes=cfg.passes, oversampling=cfg.sketch_oversampling)
    reference, seeded_b = read_bases(model), read_bases(model, "giva_B")
    client_model = build_model(TinyTask(cfg), cfg)  # a fresh client's own B, never sent
    client_b = read_bases(client_model, "giva_B")
    assert reference.keys() == held[0].keys()
    for key in reference:
        cosines = principal_cosines(reference[key], held[0][key])
        assert cosines.min() > 0.999, (key, cosines)
        assert torch.allclose(held[0][key] @ held[0][key].mT, torch.eye(cfg.giva_r), atol=1e-5)  # orthonormal rows
        assert torch.equal(seeded_b[key], client_b[key])  # B regenerates bit for bit, so only A travels
    # passes statistics exchanges, then A; the first pass sends no matrix down (seeded on the clients).
    assert [t["round"] for t in results["setup"]] == list(range(1, cfg.passes + 2))
    statistics = [m for m, _ in grid.log if m.metadata.message_type == messages.STATISTICS]
    first, second = statistics[0], statistics[CLIENTS]
    assert messages.ARRAYS not in first.content and messages.ARRAYS in second.content
    # A sketch is (in + out) x l per block, far smaller than the dense out x in gradient it stands for.
    sketch_up = sum(t["up"][0] for t in results["setup"][: cfg.passes])
    dense_bytes = 4 * sum(s.shape[0] * s.shape[1] for s in block_specs(model).values())
    assert sketch_up < dense_bytes


def test_bfloat16_sketch_transport_halves_the_setup_and_keeps_the_bases(sketch_run):
    cfg32, results32, _ = sketch_run
    cfg = config(init_mode="sketch", rounds=1, local_steps=1, passes=3, sketch_dtype="bfloat16")
    results, grid = run_inprocess(cfg, TinyTask, keep_log=True)
    held = client_bases(grid, cfg)
    for other in held[1:]:
        assert all(torch.equal(other[k], held[0][k]) for k in held[0])
    statistics = [(m, r) for m, r in grid.log if m.metadata.message_type == messages.STATISTICS]
    for message, reply in statistics:  # sums up and test matrices down travel in bfloat16 (2 bytes a number)
        for m in (message, reply):
            if messages.ARRAYS in m.content:
                (name,) = m.content[messages.ARRAYS].keys()
                assert name == messages.PACKED_BF16
    up16 = sum(t["up"][0] for t in results["setup"][: cfg.passes])
    up32 = sum(t["up"][0] for t in results32["setup"][: cfg.passes])
    assert 0.45 * up32 < up16 < 0.6 * up32
    assert results["setup"][-1]["down"] == results32["setup"][-1]["down"]  # A itself is sent as the model stores it
    model = build_model(TinyTask(cfg), cfg)
    initialize(model, union_batches(cfg, [0, 1, 2]), num_batches=CLIENTS * cfg.num_batches, progress=False,
               mode="sketch", passes=cfg.passes, oversampling=cfg.sketch_oversampling)
    reference = read_bases(model)
    for key in reference:
        assert principal_cosines(reference[key], held[0][key]).min() > 0.99, key
        assert torch.allclose(held[0][key] @ held[0][key].mT, torch.eye(cfg.giva_r), atol=1e-5)


@pytest.mark.parametrize("init_mode", ["dense", "sketch"])
def test_bfloat16_bases_travel_as_the_model_stores_them(init_mode, dense_run, sketch_run, tmp_path):
    """``bases_dtype="bfloat16"``: A is sent in bfloat16 (half its float32 bytes), every client holds the
    server's A bit for bit, and the bytes reported are the serialized sizes."""
    cfg32, results32, grid32 = dense_run if init_mode == "dense" else sketch_run
    cfg = config(init_mode=init_mode, rounds=1, local_steps=1, bases_dtype="bfloat16",
                 **({"passes": 3, "sketch_dtype": "float32"} if init_mode == "sketch" else {}))
    checkpoint = tmp_path / "run.pt"
    results, grid = run_inprocess(cfg, TinyTask, keep_log=True, checkpoint=str(checkpoint))
    server = torch.load(checkpoint, weights_only=False)["delivered"]  # the server model's A, read after the setup
    model = build_model(TinyTask(cfg), cfg)
    assert all(a.dtype == torch.bfloat16 for a in server.values())
    for held in client_bases(grid, cfg):
        assert held.keys() == server.keys()
        assert all(held[k].dtype == torch.bfloat16 and torch.equal(held[k], server[k]) for k in server)
        apply_bases(model, held)  # a client's model stores exactly what it received
        assert all(torch.equal(a, server[k]) for k, a in read_bases(model).items())
    if init_mode == "dense":  # the one-process bases over the union, rounded once to bfloat16
        reference = one_process_dense_bases(model, union_batches(cfg, [0, 1, 2]), peft_config(cfg))
        assert all(torch.equal(reference[k].bfloat16(), server[k]) for k in server)
    bases_messages = [m for m, _ in grid.log if m.metadata.message_type == messages.BASES]
    numbers = sum(cfg.giva_r * spec.in_features for spec in block_specs(model).values())
    assert len(bases_messages) == CLIENTS
    for message in bases_messages:  # one packed bfloat16 array of A's numbers, 2 bytes each
        assert list(message.content[messages.ARRAYS].keys()) == [messages.PACKED_BF16]
        assert messages.payload_bytes(message) == 2 * numbers
    down, down32 = results["setup"][-1]["down"], results32["setup"][-1]["down"]
    # The 2 bytes a number saved, less a few header bytes (the bfloat16 array's longer name)
    assert all(2 * numbers - 16 <= d32 - d <= 2 * numbers for d, d32 in zip(down, down32))
    assert results["setup"][:-1] == results32["setup"][:-1]  # the statistics exchanges do not change
    reported = [results["handshake"], *results["setup"]] + [r["traffic"] for r in results["rounds"][1:]]
    assert [(d, u) for t in reported for d, u in zip(t["down"], t["up"])] == [(d, u) for _, _, d, u in grid.sent]
    # The bytes table's A message (random values in the model's layout) is the run's, up to metadata (README: 30 bytes).
    table_down, table_up = wire_sizes(cfg, TinyTask)["setup"][-1]
    assert abs(table_down - down[0]) <= 30 and abs(table_up - results["setup"][-1]["up"][0]) <= 30


def test_a_checkpoint_from_before_a_new_config_field_resumes_at_its_default():
    cfg = config()
    saved = asdict(cfg)
    del saved["bases_dtype"]  # written before the field existed
    assert cfg.same_run(saved) and cfg.same_run(asdict(cfg))
    assert not config(bases_dtype="bfloat16").same_run(saved)
    assert not config(rounds=3).same_run(asdict(cfg))


class FailingTask(TinyTask):
    """Fails the first time any client trains round ``fail_at`` (a killed run)."""

    fail_at = 2
    failed = False

    def train_batches(self, partition: int, num_partitions: int, round_index: int):
        if round_index == self.fail_at and not FailingTask.failed:
            FailingTask.failed = True
            raise RuntimeError("killed")
        return super().train_batches(partition, num_partitions, round_index)


class NoisyTask(TinyTask):
    """Draws from the process's global RNG before every local round, as other code in a process may."""

    def train_batches(self, partition: int, num_partitions: int, round_index: int):
        torch.rand(17 * (partition + 1) + round_index)
        return super().train_batches(partition, num_partitions, round_index)


@pytest.mark.parametrize("method", ["giva", "lora", "vera"])
def test_a_round_depends_on_the_run_seed_not_on_the_process_rng_history(method):
    # The tiny BERT trains with dropout 0.1: its masks must come from (seed, round, client), not from
    # whatever else drew random numbers in the process (the cause of VeRA's once-differing resume).
    cfg = config(method=method, rounds=2, local_steps=2, init_mode="dense")
    state = torch.random.get_rng_state()
    quiet, _ = run_inprocess(cfg, TinyTask)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left as it was
    noisy, _ = run_inprocess(cfg, NoisyTask)
    assert [r["train_loss"] for r in noisy["rounds"]] == [r["train_loss"] for r in quiet["rounds"]]
    assert [r["accuracy"] for r in noisy["rounds"]] == [r["accuracy"] for r in quiet["rounds"]]
    other, _ = run_inprocess(replace(cfg, seed=1), TinyTask)
    assert [r["train_loss"] for r in other["rounds"]][1:] != [r["train_loss"] for r in quiet["rounds"]][1:]


@pytest.mark.parametrize("method", ["giva", "lora", "vera"])
def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result(method, tmp_path):
    cfg = config(method=method, rounds=3, local_steps=1, init_mode="dense")  # dense: the cheaper GiVA setup
    whole, _ = run_inprocess(cfg, TinyTask)
    checkpoint = str(tmp_path / "run.pt")
    FailingTask.failed = False
    with pytest.raises(RuntimeError, match="killed"):
        run_inprocess(cfg, FailingTask, checkpoint=checkpoint)
    resumed, grid = run_inprocess(cfg, FailingTask, checkpoint=checkpoint)
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in whole["rounds"]]
    assert [r["traffic"] for r in resumed["rounds"]] == [r["traffic"] for r in whole["rounds"]]
    assert resumed["setup"] == whole["setup"]
    # The resumed run trained only the missing rounds; the setup's result was sent again but not counted.
    assert sum(t == messages.TRAIN for t, *_ in grid.sent) == CLIENTS * (cfg.rounds - FailingTask.fail_at + 1)
    with pytest.raises(ValueError, match="another run config"):
        run_inprocess(config(method=method, rounds=4, local_steps=1, init_mode="dense"), TinyTask, checkpoint=checkpoint)


class ZeroHeadTask(TinyTask):
    """A zero classifier head: no adapted layer's weight affects the loss, every gradient is zero."""

    def base_model(self) -> torch.nn.Module:
        model = super().base_model()
        with torch.no_grad():
            model.classifier.weight.zero_()
        return model


@pytest.mark.parametrize("init_mode", ["dense", "sketch"])
def test_a_setup_whose_gradient_is_all_zero_is_refused_in_both_modes(init_mode):
    """As one process's initialisation refuses it; the dense setup took the SVD of the zero matrix (bases: rows of
    the identity) and trained on."""
    with pytest.raises(GradientInitError, match=r"GiVA layer '.*' \(block 0\) received an all-zero gradient; it does "
                                                 "not affect the loss on the calibration data"):
        run_inprocess(config(init_mode=init_mode, rounds=1, local_steps=1, sketch_dtype="float32"), ZeroHeadTask)


def test_a_reply_with_non_finite_values_stops_the_round_before_it_is_averaged(tmp_path, monkeypatch):
    """A client whose tensors went NaN with a finite loss: its reply was averaged into the global state, which the
    run scored, checkpointed and went on from. The round stops before the average; the checkpoint keeps the round
    before, and a resume gives the uninterrupted run."""
    import giva.federated.client_app as client_app

    cfg = config(rounds=3, local_steps=1, init_mode="dense")
    whole, _ = run_inprocess(cfg, TinyTask)
    trained = client_app.local_train

    def poisoned(model, batches, steps, lr, seed):  # client 2 in round 2, past its own check
        losses = trained(model, batches, steps, lr, seed)
        if seed == client_seed(cfg.seed, 2, 2):
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "giva_lambda_o" in n).fill_(float("nan"))
        return losses

    monkeypatch.setattr(client_app, "local_train", poisoned)
    checkpoint = str(tmp_path / "run.pt")
    with pytest.raises(RuntimeError, match=r"round 2: non-finite values in the replies of 1 client\(s\) \(node \d+: "
                                           r".*giva_lambda_o.*\); nothing of the round was averaged or checkpointed "
                                           r"\(the checkpoint holds round 1\)"):
        run_inprocess(cfg, TinyTask, checkpoint=checkpoint)
    saved = torch.load(checkpoint, weights_only=False)
    assert len(saved["rounds"]) == 2 and all(torch.isfinite(t).all() for t in saved["trainable"].values())
    monkeypatch.undo()
    resumed, _ = run_inprocess(cfg, TinyTask, checkpoint=checkpoint)
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in whole["rounds"]]
    assert [r["train_loss"] for r in resumed["rounds"]] == [r["train_loss"] for r in whole["rounds"]]


def test_local_training_refuses_to_send_tensors_that_went_non_finite():
    """An inf gradient at a finite loss: clipping makes it NaN and the step writes NaN into the vectors."""
    cfg = config(init_mode="dense")
    model = build_model(TinyTask(cfg), cfg)
    initialize(model, union_batches(cfg, [0]), num_batches=2, progress=False, mode="exact")
    vector = next(p for n, p in model.named_parameters() if "giva_lambda_o" in n)
    vector.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError, match=r"local training diverged: non-finite values in \[.*giva_lambda"):
        local_train(model, iter(union_batches(cfg, [0])), 1, 1e-2, seed=0)


@pytest.mark.parametrize("method,node_config,problems", [
    ("giva", {1002: {"partition-id": 0}},  # `--node-config "partition-id=0 ..."` typed for two SuperNodes
     "partition-id 0 is held by nodes [1000, 1002]; no node holds partition-id(s) [2] (1000 holds 0 of 3, 1001 "
     "holds 1 of 3, 1002 holds 0 of 3)"),
    ("lora", {node: {"num-partitions": 4} for node in (1000, 1001, 1002)},  # started as 4 shards for 3 clients
     "node(s) [1000, 1001, 1002] have num-partitions [4] (1000 holds 0 of 4, 1001 holds 1 of 4, 1002 holds 2 of 4)"),
])
def test_nodes_holding_the_wrong_shards_stop_the_run_before_the_model_loads(method, node_config, problems, monkeypatch):
    """Every node reports its node config's shard first; duplicated or missing ids, or another num-partitions,
    stop the run before the model loads and before any setup or train message (they trained unseen before)."""
    cfg = config(method=method, init_mode="dense", rounds=1, local_steps=1)
    grid = InProcessGrid(make_client_app(TinyTask, cfg), CLIENTS)
    for node, values in node_config.items():
        grid.contexts[node].node_config.update(values)
    monkeypatch.setattr("giva.federated.server_app.build_model", lambda *a: pytest.fail("the model was built"))
    with _ServerIdentity(), pytest.raises(ValueError) as raised:
        run_server(grid, cfg, TinyTask)
    assert str(raised.value) == (
        f"the nodes' shards do not match the run's 3 clients: {problems}; expected partition-id 0..2 once each and "
        "num-partitions 3: start each SuperNode with --node-config \"partition-id=<i> num-partitions=3\"")
    assert [kind for kind, *_ in grid.sent] == [messages.PARTITION] * CLIENTS


def test_fedavg_is_the_example_weighted_mean():
    generator = torch.Generator().manual_seed(0)
    states = [{"v": torch.randn(5, generator=generator), "h": torch.randn(2, 3, generator=generator)} for _ in range(3)]
    weights = [16, 32, 48]
    averaged = fedavg(states, weights)
    for name in ("v", "h"):
        expected = sum(w * s[name].double() for w, s in zip(weights, states)) / sum(weights)
        assert torch.allclose(averaged[name].double(), expected, atol=1e-7)
    with pytest.raises(ValueError, match="positive"):
        fedavg(states, [1, 0, 2])


def test_rounds_until_tenfold_fewer_bytes_measured_or_extrapolated():
    def run(setup: int, per_round: int, rounds: int) -> dict:
        return {"cumulative_bytes": [setup + n * per_round for n in range(rounds + 1)]}

    lora = run(0, 100, 10)
    # 10 (S + n g) <= n l: S = 300, g = 5, l = 100 -> n >= 3000 / 50 = 60 (beyond the 10 rounds measured)
    assert rounds_to_fewer_bytes(run(300, 5, 10), lora) == (60, False)
    assert rounds_to_fewer_bytes(run(20, 5, 10), lora) == (4, True)  # 10 * 40 = 400 <= 400, measured
    assert rounds_to_fewer_bytes(run(0, 10, 10), lora) == (1, True)
    assert rounds_to_fewer_bytes(run(300, 10, 10), lora) == (None, False)  # a round costs 1/10 of LoRA's: never


def test_server_applies_fedavg_of_the_client_replies(dense_run):
    cfg, results, grid = dense_run
    train = [(m, r) for m, r in grid.log if m.metadata.message_type == messages.TRAIN]
    round1 = [r for m, r in train if m.content[messages.CONFIG]["round"] == 1]
    round2_sent = [m for m, r in train if m.content[messages.CONFIG]["round"] == 2]
    weights = [int(r.content[messages.METRICS]["num-examples"]) for r in round1]
    assert sorted(weights) == [16, 32, 48]  # unequal shards, so the weights matter
    layout = train_layout(cfg)
    expected = fedavg([messages.record_tensors(r.content[messages.ARRAYS], layout) for r in round1], weights)
    for sent in round2_sent:
        got = messages.record_tensors(sent.content[messages.ARRAYS], layout)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    unweighted = fedavg([messages.record_tensors(r.content[messages.ARRAYS], layout) for r in round1], [1, 1, 1])
    assert any(not torch.allclose(unweighted[k], expected[k]) for k in expected)


def test_giva_rounds_send_only_the_vectors_and_the_head(dense_run):
    cfg, _, grid = dense_run
    layout = train_layout(cfg)
    names = [name for name, _ in layout]
    assert names and all(("giva_lambda_" in n) or ("classifier" in n) for n in names)
    assert any("classifier" in n for n in names)
    sent = next(m for m, _ in grid.log if m.metadata.message_type == messages.TRAIN)
    (flat,) = sent.content[messages.ARRAYS].to_torch_state_dict().values()  # one packed array
    assert flat.numel() == sum(torch.Size(shape).numel() for _, shape in layout)
    bases_msg = next(m for m, _ in grid.log if m.metadata.message_type == messages.BASES)
    model = build_model(TinyTask(cfg), cfg)
    (a_flat,) = bases_msg.content[messages.ARRAYS].to_torch_state_dict().values()
    assert a_flat.numel() == sum(cfg.giva_r * s.in_features for s in block_specs(model).values())  # A only, r x in


def test_packed_tensors_need_the_receivers_layout():
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    record = messages.tensors_record(tensors)
    back = messages.record_tensors(record, messages.layout_of(tensors))
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    halves = {k: (v / 3).bfloat16() for k, v in tensors.items()}  # bfloat16 survives Flower's numpy arrays bit for bit
    back = messages.record_tensors(messages.tensors_record(halves), messages.layout_of(halves))
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], halves[k]) for k in halves)
    with pytest.raises(ValueError, match="same model"):
        messages.record_tensors(record, [("a", (2, 3))])


def test_reported_bytes_are_the_serialized_message_sizes(dense_run):
    _, results, grid = dense_run
    reported = [results["handshake"], *results["setup"]] + [r["traffic"] for r in results["rounds"][1:]]
    measured = [(d, u) for _, _, d, u in grid.sent]  # sizes of the bytes the grid actually shipped
    flat = [(d, u) for t in reported for d, u in zip(t["down"], t["up"])]
    assert flat == measured
    for message, reply in grid.log:  # the tensors plus headers: never less, and a bounded overhead per array
        for m in (message, reply):
            arrays = len(m.content[messages.ARRAYS]) if messages.ARRAYS in m.content else 0
            assert messages.payload_bytes(m) <= messages.message_bytes(m) <= messages.payload_bytes(m) + 2048 + 600 * arrays


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_baselines_run_and_vera_projections_are_the_only_setup(method):
    cfg = config(method=method, rounds=1, local_steps=1)
    results, grid = run_inprocess(cfg, TinyTask)
    kinds = {t for t, *_ in grid.sent}
    if method == "lora":
        assert kinds == {messages.PARTITION, messages.TRAIN} and results["setup_bytes"] == 0
    else:
        assert kinds == {messages.PARTITION, messages.TRAIN, messages.BASES} and results["setup_bytes"] > 0
        without = run_inprocess(config(method=method, rounds=1, local_steps=1, vera_projections=False), TinyTask)[0]
        assert without["setup_bytes"] == 0
        assert without["rounds"][-1]["accuracy"] == results["rounds"][-1]["accuracy"]


def test_report_from_checkpoints_rebuilds_the_runs_table(tmp_path):
    from giva.federated.run import report_checkpoints

    runs = {}
    for method in ("lora", "vera"):
        cfg = config(method=method, rounds=1, local_steps=1)
        runs[method], _ = run_inprocess(cfg, TinyTask, checkpoint=str(tmp_path / ".checkpoints" / f"{method}.pt"))
    out = report_checkpoints(str(tmp_path), targets=[0.5])
    labels = [s["label"] for s in out["summaries"]]
    assert labels == ["lora r=2", "vera r=8, projections sent", "vera r=8, seed only"]
    lora, vera, seed_only = out["summaries"]
    assert vera["setup_bytes"] == runs["vera"]["setup_bytes"] > 0 and seed_only["setup_bytes"] == 0
    assert vera["accuracy"] == seed_only["accuracy"] == [r["accuracy"] for r in runs["vera"]["rounds"]]
    rows = out["table"].splitlines()
    assert rows[0].endswith("| rounds until 10x fewer bytes than LoRA |")
    expected = [rounds_to_fewer_bytes(s, lora) for s in (vera, seed_only)]
    for row, (n, measured) in zip(rows[3:], expected):
        assert row.endswith("| never |" if n is None else f"| {n}{'' if measured else ' (extrapolated)'} |")
    table, per_round = (tmp_path / "results.md").read_text().strip().split("\n\n")
    assert table == out["table"]
    rows = {row.split(" | ")[0].lstrip("| "): row.strip("| ").split(" | ")[1:] for row in per_round.splitlines()[2:]}
    for s in out["summaries"]:  # every round's accuracy and cumulative MB, as the summaries hold them
        assert rows[f"{s['label']}: accuracy %"] == [f"{100 * a:.2f}" for a in s["accuracy"]]
        assert [float(x) for x in rows[f"{s['label']}: MB sent so far"]] == pytest.approx(
            [b / 1e6 for b in s["cumulative_bytes"]], abs=5e-4)


def test_label_skew_shards_are_disjoint_equal_and_skewed():
    labels = [i % 2 for i in range(400)]
    shards = shard_indices(labels, 4, "label-skew", seed=0, skew=0.8)
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(400)) and all(len(s) == 100 for s in shards)
    for c, shard in enumerate(shards):
        assert sum(labels[i] == c % 2 for i in shard) >= 80
    iid = shard_indices(labels, 4, "iid", seed=0)
    assert all(40 <= sum(labels[i] for i in s) <= 60 for s in iid)


@pytest.mark.parametrize(
    "field,value,match",
    [("split", "dirichlet", "split"), ("method", "adapter", "method"), ("clients", 0, "clients"),
     ("init_mode", "exact", "init_mode"), ("skew", 1.5, "skew"), ("sketch_dtype", "float16", "sketch_dtype"),
     ("oversample", -2, "oversample"), ("val_size", -1, "val_size"), ("bases_dtype", "float16", "bases_dtype"),
     ("vera_projections", "False", r"vera_projections must be true or false, got 'False'"), ("skew", True, "skew"),
     ("max_train_samples", True, r"max_train_samples must be an integer or None, got True")],
)
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        FederatedConfig(**{field: value})


def test_run_config_round_trip_and_unknown_keys():
    cfg = config(method="vera", split="label-skew")
    assert FederatedConfig.from_flat({**cfg.to_flat(), "results-path": "x.json"}) == cfg
    with pytest.raises(ValueError, match="unknown federated config key"):
        FederatedConfig.from_flat({"num-rounds": 3})


def test_flower_app_config_names_real_apps_and_valid_options():
    import importlib
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    import giva.federated

    app_toml = Path(giva.federated.__file__).parent / "flower_app" / "pyproject.toml"
    tool = tomllib.loads(app_toml.read_text())["tool"]["flwr"]["app"]
    FederatedConfig.from_flat(tool["config"])  # every key is a FederatedConfig field with a valid value
    for key, kind in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, attr = tool["components"][key].split(":")
        assert isinstance(getattr(importlib.import_module(module), attr), kind)


class TinyCausalTask(TinyTask):
    """The causal-LM variant on a tiny Llama: language-model batches, prompts scored by two candidate tokens."""

    def base_model(self) -> torch.nn.Module:
        return tiny_llama(seed=self.cfg.seed)

    def _shard(self, partition: int) -> list[dict]:
        return text_batches(n=4 * (partition + 1), batch=4, length=8, labels="lm", seed=100 + partition)

    def test_batches(self) -> list[dict]:
        generator = torch.Generator().manual_seed(999)
        ids = torch.randint(0, VOCAB, (6, 8), generator=generator)
        mask = torch.ones_like(ids)
        mask[::2, 5:] = 0  # right padding on every other prompt
        labels = torch.randint(0, 2, (6,), generator=generator)
        return [{"input_ids": ids, "attention_mask": mask, "labels": labels, CANDIDATES: torch.tensor([5, 7])}]


def test_causal_lm_variant_runs_setup_and_a_round_sending_only_the_vectors():
    cfg = config(task="causal-lm", target_modules="q_proj,v_proj,up_proj", rounds=1, local_steps=1)
    results, grid = run_inprocess(cfg, TinyCausalTask, keep_log=True)
    held = [messages.record_tensors(ctx.state[STATE_KEY], bases_layout(build_model(TinyCausalTask(cfg), cfg)))
            for ctx in grid.contexts.values()]
    assert all(torch.equal(other[k], held[0][k]) for other in held[1:] for k in held[0])
    assert [t for t, *_ in grid.sent].count(messages.STATISTICS) == CLIENTS * cfg.passes
    model = build_model(TinyCausalTask(cfg), cfg)
    names = [name for name, _ in messages.layout_of(trainable_state(model))]
    assert names and all("giva_lambda_" in n for n in names)  # a causal LM has no head to send
    assert len(results["rounds"]) == 2 and 0.0 <= results["rounds"][-1]["accuracy"] <= 1.0
    sent = [m for m, _ in grid.log if m.metadata.message_type == messages.TRAIN][0]
    assert messages.payload_bytes(sent) == 4 * sum(torch.Size(s).numel() for _, s in messages.layout_of(trainable_state(model)))


@pytest.mark.real
def test_the_causal_lm_task_truncates_a_long_sentence_never_its_cue_or_label_word():
    """With SmolLM2's tokenizer and the bundled Pang & Lee rows (no model loaded): every training row ends with
    " Sentiment: <label word>" and every test prompt with " Sentiment:", however short max_length is (at the
    default 64, 7 training rows lost their label word and 2 test prompts their cue)."""
    from giva.federated.task import LABEL_WORDS, CausalLMTask

    task = CausalLMTask(config(task="causal-lm", model="smollm2", data="pang-lee", max_length=12, clients=2))
    encode = partial(task.tokenizer, add_special_tokens=False)
    words = LABEL_WORDS["pang-lee"]
    ends = [encode(f" Sentiment: {word}")["input_ids"] for word in words]
    rows = task._encoded["input_ids"]
    assert len(rows) == len(task.train_set.labels) and max(map(len, rows)) == 12
    assert all(ids[-len(ends[label]):] == ends[label] for ids, label in zip(rows, task.train_set.labels))
    cue = encode(" Sentiment:")["input_ids"]
    prompts = [ids[mask.bool()].tolist() for batch in task.test_batches()
               for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert len(prompts) == len(task.test_set.labels) and all(p[-len(cue):] == cue for p in prompts)


class HalfCausalTask(TinyCausalTask):
    """TinyCausalTask on an fp16 model: the clients' setup passes take loss-scaled fp16 output gradients."""

    def base_model(self) -> torch.nn.Module:
        return tiny_llama(seed=self.cfg.seed).to(torch.float16)


def test_a_clients_fp16_loss_scale_is_kept_from_setup_pass_to_pass(monkeypatch):
    """As in giva.init.initialize (test_init_precision::test_the_fp16_loss_scale_is_kept_from_pass_to_pass): a client's
    later sketch passes, each its own message, start at the loss scale (and the count of batches without an overflow)
    where its first pass left it, so only the first pass halves it down from 2**16; then GROWTH_INTERVAL batches in a
    row without an overflow double it once, which costs each client one more attempt in its last pass."""
    import giva.federated.client_app as client_app

    forwards: list[int] = []  # the pass index of every forward
    accumulate = client_app.accumulate

    def overflowing(model, batches, request, **kwargs):
        def loss_fn(model, batch):  # 2**12 times the loss: at the first loss scale (2**16) its fp16 gradients overflow
            forwards.append(request.pass_index)
            return model(**batch).loss * 2**12

        return accumulate(model, batches, request, loss_fn=loss_fn, **kwargs)

    monkeypatch.setattr(client_app, "accumulate", overflowing)
    cfg = config(task="causal-lm", target_modules="q_proj,v_proj", rounds=1, local_steps=1, passes=3)
    _, grid = run_inprocess(cfg, HalfCausalTask)
    calibration = CLIENTS * cfg.num_batches
    assert forwards.count(0) > calibration  # the first pass ran batches again, at smaller scales
    # Each client's clean re-run of batch 0 and batch 1 in pass 0 and its two batches in pass 1: GROWTH_INTERVAL (4)
    # without an overflow double its scale, at which pass 2's first batch overflows once more. Were forwards.count(0)
    # each (36 here) with a fresh scale per pass, calibration each with a scale that never grew back.
    assert GROWTH_INTERVAL == 4 and cfg.num_batches == 2
    assert forwards.count(1) == calibration
    assert forwards.count(2) == calibration + CLIENTS
    layout = bases_layout(build_model(HalfCausalTask(cfg), cfg))
    held = [messages.record_tensors(ctx.state[STATE_KEY], layout) for ctx in grid.contexts.values()]
    assert all(torch.equal(other[k], held[0][k]) and torch.isfinite(held[0][k]).all() for other in held for k in held[0])


def test_candidate_accuracy_scores_the_label_words_after_each_prompts_last_token():
    cfg = config(task="causal-lm", target_modules="q_proj,v_proj")
    model = TinyCausalTask(cfg).base_model()
    (batch,) = TinyCausalTask(cfg).test_batches()
    expected = []
    with torch.no_grad():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            prompt = ids[: int(mask.sum())].unsqueeze(0)  # unpadded, alone
            expected.append(int(model(input_ids=prompt).logits[0, -1, batch[CANDIDATES]].argmax()))
    expected = torch.tensor(expected)
    assert accuracy(model, [batch]) == pytest.approx(float((expected == batch["labels"]).float().mean()))
    flipped = {**batch, "labels": 1 - expected}
    assert accuracy(model, [flipped]) == 0.0 and accuracy(model, [{**batch, "labels": expected}]) == 1.0


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="reads /proc (Linux)")
def test_local_deployment_stops_every_process_it_started_even_in_their_own_sessions():
    import subprocess
    import time

    from giva.federated.local_deployment import descendants, parse_overrides, stop

    # A parent that starts a grandchild in a session of its own, as Flower's SuperExec does.
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "start_new_session=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 20
    while not descendants([parent.pid]) and time.monotonic() < deadline:
        time.sleep(0.1)
    (child,) = descendants([parent.pid])
    stop([parent], grace=5)
    assert parent.poll() is not None
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert parse_overrides(["rounds=2", "lr=0.5", "method=lora", "vera-projections=false"]) == {
        "rounds": 2, "lr": 0.5, "method": "lora", "vera-projections": False}
    assert parse_overrides(["vera-projections=False", "init-mode=TRUE"]) == {  # was: the text 'False', taken as true
        "vera-projections": False, "init-mode": True}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["rounds"])


PROG = "python -m giva.federated.local_deployment"


def _by_hand_commands() -> list[tuple[str, str, str]]:
    """(where, command, line) of every flower-superlink / flower-supernode / flwr run line of the by-hand steps:
    the comment atop the Flower app's pyproject.toml and the bash blocks of docs/federated.md."""
    import re

    import giva.federated

    app_toml = Path(giva.federated.__file__).parent / "flower_app" / "pyproject.toml"
    doc = Path(__file__).parents[1] / "docs" / "federated.md"
    sources = {app_toml.name: [line.lstrip("#").strip() for line in app_toml.read_text().splitlines()
                               if line.startswith("#")],
               doc.name: [line.strip() for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)
                          for line in block.splitlines()]}
    found = []
    for where, lines in sources.items():
        for line in lines:
            words = line.split("  #")[0].split()
            command = "flwr run" if words[:2] == ["flwr", "run"] else (words or [""])[0]
            if command in ("flower-superlink", "flower-supernode", "flwr run"):
                found.append((where, command, " ".join(words)))
    return found


def test_the_by_hand_superlink_steps_use_options_the_installed_flower_takes():
    """The by-hand steps once told SuperNodes `--clientappio-api-address 127.0.0.1:9094`, which Flower 1.42 refuses
    ("use --host and --port instead"), the same for every node. Every option of those lines must be one the --help of
    the installed entry point lists, and every SuperNode has a --port of its own, as local_deployment starts them."""
    import re
    import subprocess

    from giva.federated import local_deployment
    from giva.federated.local_deployment import _bin

    commands = _by_hand_commands()
    assert {(where, command) for where, command, _ in commands} == {
        (where, command) for where in ("pyproject.toml", "federated.md")
        for command in ("flower-superlink", "flower-supernode", "flwr run")}
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    listed = {}
    for command in ("flower-superlink", "flower-supernode", "flwr run"):
        binary, *sub = command.split()
        shown = subprocess.run([_bin(binary), *sub, "--help"], capture_output=True, text=True, env=env, timeout=120)
        listed[command] = set(re.findall(r"--[a-z][a-z0-9-]*", shown.stdout))
        assert "--insecure" in listed[command] or command == "flwr run", shown
    for where, command, line in commands:
        for option in re.findall(r"(?<!\S)--[a-z][a-z0-9-]*", line):
            assert option in listed[command], f"{where}: {command} {option} is not an option of the installed Flower"
    for where in ("pyproject.toml", "federated.md"):
        ports = [re.search(r"--port (\d+)", line).group(1) for w, command, line in commands
                 if w == where and command == "flower-supernode"]
        assert len(ports) >= 2 and len(set(ports)) == len(ports), (where, ports)
    assert "README" not in local_deployment.__doc__ and "docs/federated.md" in local_deployment.__doc__


def test_the_flower_app_declares_every_key_the_apps_read():
    """A run-config key the app does not declare is refused by the SuperLink ("Invalid run configuration", code 15):
    checkpoint-path (read by the ServerApp) and task / text-column / label-column were missing, so a resumable or
    causal-LM `flwr run` was impossible. "" stands for no checkpoint."""
    from dataclasses import fields

    from flwr.common.config import flatten_dict, get_project_config

    import giva.federated
    from giva.federated.task import RUN_ONLY_KEYS

    app = get_project_config(Path(giva.federated.__file__).parent / "flower_app")  # as Flower reads it
    declared = flatten_dict(app["tool"]["flwr"]["app"]["config"])
    read = {f.name.replace("_", "-") for f in fields(FederatedConfig)} | set(RUN_ONLY_KEYS)
    assert sorted(read - set(declared)) == []
    assert declared["checkpoint-path"] == ""


@pytest.fixture
def no_deployment(monkeypatch, tmp_path):
    """local_deployment.main with TinyTask's data, no process started (the call is recorded), run in tmp_path."""
    from giva.federated import local_deployment

    calls = []

    def fake(run_config, clients, workdir, **kwargs):
        calls.append((run_config, clients))
        return {"setup_bytes": 1, "rounds": [], "wall_seconds": 0.0, "flwr_run_output": ["done"]}

    monkeypatch.setattr(local_deployment, "run_local_deployment", fake)
    monkeypatch.setattr(local_deployment, "default_task", TinyTask)
    monkeypatch.chdir(tmp_path)
    return calls


@pytest.mark.parametrize("argv,message", [
    ([], None),
    (["clients=2", "rounds=2"], None),  # OUTPUT_DIR left out: it once wrote into a folder named clients=2
    (["--out", "clients=2"], None),  # an option where OUTPUT_DIR goes: it once became the output folder
    (["out", "round=2"], "unknown run-config key(s) ['round']; "),
    (["out", "rounds"], "run-config overrides are key=value, got 'rounds'"),
    (["out", "clients=0"], "FederatedConfig.clients must be a positive integer, got 0"),
    (["out", "vera-projections=off"], "FederatedConfig.vera_projections must be true or false, got 'off'"),
    (["out", "clients=3", "max-train-samples=2"],
     "FederatedConfig.max_train_samples (2) leaves fewer sentences than clients (3)"),
    (["out", "clients=3", "num-batches=5", "batch-size=4"],  # TinyTask's smallest shard: 16 sentences
     "data 'pang-lee' split over 3 clients gives a client 16 training sentences, fewer than its 5 calibration batches "
     "of 4 (20); use fewer clients, more training data, or a smaller num-batches= / batch-size="),
], ids=["nothing", "no-output-dir", "option", "typo", "no-value", "bad-value", "bad-switch", "samples", "data"])
def test_local_deployment_refuses_bad_input_in_one_line_before_starting_anything(no_deployment, capsys, tmp_path,
                                                                                 argv, message):
    """Bad input once came back after ~24 s of starting a SuperLink and SuperNodes, as ~47 lines of nested traceback
    (a typo key: "Invalid run configuration"; the ServerApp's ValueError wrapped in a RuntimeError)."""
    from giva.federated.local_deployment import main

    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    if message is None:
        assert err[0] == f"usage: {PROG} OUTPUT_DIR [clients=N] [key=value ...]" and len(err) == 2 and err[1].startswith(f"{PROG}: error: the first argument is OUTPUT_DIR")
    else:
        assert len(err) == 1 and err[0].startswith(f"{PROG}: error: {message}"), err
    assert no_deployment == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["file/out"], "OUTPUT_DIR 'file/out' is not writable: Not a directory"),
    (["file"], "OUTPUT_DIR 'file' is a file, not a folder"),
], ids=["under-a-file", "a-file"])
def test_local_deployment_refuses_an_output_dir_it_cannot_make_before_starting_anything(no_deployment, capsys, tmp_path,
                                                                                       argv, message):
    """OUTPUT_DIR was once made only after the run, so a folder the results cannot go to failed after the whole
    federated run, as a traceback."""
    from giva.federated.local_deployment import main

    (tmp_path / "file").write_text("a regular file")
    assert main([*argv, "num-batches=1", "batch-size=4"]) == 2  # a config that passes every other check
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{PROG}: error: {message}"]
    assert no_deployment == [] and [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_local_deployment_refuses_an_output_dir_it_cannot_write(no_deployment, capsys, tmp_path):
    from giva.federated.local_deployment import main

    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o555)
    try:
        assert main(["locked/out", "num-batches=1", "batch-size=4"]) == 2
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert capsys.readouterr().err.splitlines() == [f"{PROG}: error: OUTPUT_DIR 'locked/out' is not writable: Permission denied"]
    assert no_deployment == []


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_local_deployment_help_prints_the_usage_and_starts_nothing(no_deployment, capsys, tmp_path, flag):
    # --help was once taken for OUTPUT_DIR: the data was checked and a SuperLink run started.
    from giva.federated.local_deployment import main

    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {PROG} OUTPUT_DIR [clients=N] [key=value ...]") and "SuperLink" in out
    assert no_deployment == [] and list(tmp_path.iterdir()) == []


def test_local_deployment_runs_the_checked_config(no_deployment, capsys, tmp_path):
    from giva.federated.local_deployment import main

    assert main(["out", "clients=3", "num-batches=4", "batch-size=4", "rounds=2"]) == 0
    assert no_deployment == [({"num-batches": 4, "batch-size": 4, "rounds": 2}, 3)]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["command"].endswith("local_deployment out clients=3 num-batches=4 batch-size=4 rounds=2")


def test_a_comparison_trains_each_method_and_the_centralised_baseline_at_its_own_lr(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = config(rounds=1, local_steps=1, init_mode="dense")
    with pytest.raises(ValueError, match=r"lrs: unknown method\(s\) \['giva2'\]"):
        run_comparison(cfg, str(tmp_path), methods=("giva",), task_factory=TinyTask, lrs={"giva2": 0.1})
    assert not (tmp_path / "results.json").exists()  # refused before any run

    out = run_comparison(cfg, str(tmp_path), methods=("giva", "lora"), task_factory=PooledTinyTask,
                         lrs={"giva": 0.02, "lora": 0.004})
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["runs"]["giva"]["config"]["lr"] == 0.02 and stored["runs"]["lora"]["config"]["lr"] == 0.004
    assert stored["centralised"]["config"]["lr"] == 0.02
    assert out["table"]


class PooledTinyTask(TinyTask):
    """TinyTask with the pooled batches the centralised baseline trains on."""

    def pooled_batches(self, round_index: int = 0, skip: int = 0):
        return iter(text_batches(n=40, batch=4, length=8, seed=7)[skip:])


class KilledPooledTask(PooledTinyTask):
    """The first training loader dies after ``kill_after`` batches (a killed run)."""

    kill_after = 4
    killed = False

    def pooled_batches(self, round_index: int = 0, skip: int = 0):
        batches = super().pooled_batches(round_index, skip)
        if round_index != 0 or KilledPooledTask.killed:  # round -1: the calibration batches
            return batches
        KilledPooledTask.killed = True

        def cut():
            for index, batch in enumerate(batches):
                if index == self.kill_after:
                    raise RuntimeError("killed")
                yield batch

        return cut()


def test_the_centralised_baseline_resumes_exactly_and_leaves_the_callers_rng_alone(tmp_path):
    # 3 rounds of 3 steps; the killed run checkpoints round 1 and dies in round 2. Dropout is reseeded per
    # round, so the resumed run must end with the uninterrupted run's trainable tensors, bit for bit.
    cfg = config(rounds=3, local_steps=1, init_mode="dense")
    whole_path, cut_path = str(tmp_path / "whole.pt"), str(tmp_path / "cut.pt")
    state = torch.random.get_rng_state()
    whole = run_centralised(cfg, PooledTinyTask, whole_path)
    assert torch.equal(torch.random.get_rng_state(), state)
    KilledPooledTask.killed = False
    with pytest.raises(RuntimeError, match="killed"):
        run_centralised(cfg, KilledPooledTask, cut_path)
    assert len(torch.load(cut_path, weights_only=False)["rounds"]) == 2  # round 0 and round 1 were saved
    torch.rand(123)  # the caller's random stream moved on
    resumed = run_centralised(cfg, KilledPooledTask, cut_path)
    assert [r["accuracy"] for r in resumed["rounds"]] == [r["accuracy"] for r in whole["rounds"]]
    ends = [torch.load(path, weights_only=False)["trainable"] for path in (whole_path, cut_path)]
    assert ends[0].keys() == ends[1].keys()
    assert all(torch.equal(ends[0][name], ends[1][name]) for name in ends[0])


# --------------------------------------------------------------------------------------------------------------------
# `giva federated` on the command line: bad input is one line before any work; small CSVs; resumable output folder.


@pytest.fixture
def no_run(monkeypatch):
    """Fail the test if the command gets as far as training anything."""
    import giva.federated.run as run_module

    def refuse(*args, **kwargs):
        raise AssertionError("run_comparison was called: the bad input was not caught before the work")

    monkeypatch.setattr(run_module, "run_comparison", refuse)


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    from giva.cli import main

    code = main(["federated", *argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "nan"], "giva federated: error: argument --lr: must be a finite number, got 'nan'"),
        (["--seed", "-1"], "giva federated: error: argument --seed: must be >= 0, got '-1'"),
        (["--clients", "40", "--max-train-samples", "64"],
         "giva federated: --max-train-samples 64 with --clients 40 gives a client 1 training sentences, fewer than "
         "its 4 calibration batches of 16 (64); use fewer clients, more training data, or a smaller --num-batches / "
         "--batch-size"),
        (["--clients", "40", "--max-train-samples", "30"],  # named FederatedConfig.max_train_samples, the field, before
         "giva federated: --max-train-samples 30 leaves fewer sentences than --clients 40"),
        (["--text-column", ""], "giva federated: FederatedConfig.text_column must be a non-empty column name, got ''"),
    ],
)
def test_bad_federated_options_are_one_line_before_any_work(capsys, no_run, tmp_path, argv, message):
    code, err = _cli(capsys, *argv, "--output-dir", str(tmp_path / "out"))
    assert code == 2 and err == [message]


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_max_train_samples_holds_giva_calibration_batches_only_for_giva(capsys, tmp_path, monkeypatch, method):
    """LoRA and VeRA read no calibration batches: 64 sentences over 40 clients run (GiVA's 4 x 16 rule refused them);
    fewer sentences than clients is still refused for any method."""
    import giva.federated.run as run_module

    seen = {}

    def fake_run(config, output_dir, methods, **kwargs):
        seen.update(config=config, methods=methods)
        return {"table": "| table |"}

    monkeypatch.setattr(run_module, "run_comparison", fake_run)
    code, err = _cli(capsys, "--method", method, "--clients", "40", "--max-train-samples", "64",
                     "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    assert seen["methods"] == (method,) and seen["config"].max_train_samples == 64
    seen.clear()
    code, err = _cli(capsys, "--method", method, "--clients", "40", "--max-train-samples", "30",
                     "--output-dir", str(tmp_path / "out"))
    assert code == 2 and not seen and err == [  # the option, not the dataclass field FederatedConfig.max_train_samples
        "giva federated: --max-train-samples 30 leaves fewer sentences than --clients 40"]
    # The library, which has no options, names the field.
    with pytest.raises(ValueError, match=r"^FederatedConfig.max_train_samples \(30\) leaves fewer sentences than clients \(40\)$"):
        config(clients=40, max_train_samples=30)


def test_an_output_dir_that_is_a_file_or_read_only_is_refused_before_any_work(capsys, no_run, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    code, err = _cli(capsys, "--output-dir", str(file))
    assert code == 2 and err == [f"giva federated: --output-dir {str(file)!r} is a file, not a folder"]
    assert file.read_text() == "keep me"
    below = file / "out"  # cannot be created: one OSError path that even root meets
    code, err = _cli(capsys, "--output-dir", str(below))
    assert code == 2 and err == [f"giva federated: --output-dir {str(below)!r} is not writable: Not a directory"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user that can write into read-only folders (root)")
        code, err = _cli(capsys, "--output-dir", str(locked / "out"))
        assert code == 2 and len(err) == 1 and err[0].startswith(f"giva federated: --output-dir {str(locked / 'out')!r} is not writable")
    finally:
        locked.chmod(0o700)


def test_a_folder_with_other_methods_results_is_not_replaced(capsys, no_run, tmp_path):
    earlier = {"runs": {"giva": {"rounds": []}}}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    code, err = _cli(capsys, "--method", "vera", "--output-dir", str(tmp_path))
    assert code == 2 and err == [
        f"giva federated: {tmp_path / 'results.json'} holds results of method(s) ['giva'], which this run (['vera']) "
        "would replace; use another --output-dir (or move that folder away)"
    ]
    assert json.loads((tmp_path / "results.json").read_text()) == earlier


def test_causal_lm_task_with_an_encoder_is_refused_before_the_weights_load(capsys, no_run, tmp_path):
    folder = tmp_path / "encoder"
    tiny_bert().save_pretrained(folder)
    capsys.readouterr()
    code, err = _cli(capsys, "--task", "causal-lm", "--model", str(folder), "--output-dir", str(tmp_path / "out"))
    assert code == 2 and err == [
        f"giva federated: task 'causal-lm' needs a causal language model, but model {str(folder)!r} is "
        "['BertForSequenceClassification'] (an encoder would train a random LM head); use e.g. --model smollm2, "
        "or --task classification"
    ]


def test_nan_never_reaches_a_results_file(tmp_path):
    from giva.federated.files import write_json

    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json({"lr": float("nan")}, str(tmp_path / "results.json"))
    assert not (tmp_path / "results.json").exists()


def test_help_shows_every_default(capsys):
    from giva.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["federated", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 4)", "(default: 10)", "(default: iid)", "(default: minilm)", "(default: 400)",
                  "(default: outputs/giva-federated)", "(default: text)", "(default: label)"):
        assert shown in text, shown


def test_the_cli_passes_a_checkpoint_folder_and_quiets_libraries_unless_verbose(capsys, tmp_path, monkeypatch):
    """A small CSV with its own column names runs (--val-size 0, --text-column, --label-column); the runs get
    OUTPUT_DIR/.checkpoints, so Ctrl-C leaves a checkpoint and a rerun resumes (tested on the library in
    test_a_killed_run_resumes_from_its_checkpoint_to_the_same_result)."""
    import logging

    import giva.federated.run as run_module

    csv = tmp_path / "small.csv"
    rows = [f"a {'good' if i % 2 else 'bad'} sentence number {i}" for i in range(60)]
    csv.write_text("sentence,y\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(rows)))
    seen = {}

    def fake_run(config, output_dir, methods, **kwargs):
        from giva.federated.client_app import default_task

        seen.update(config=config, output_dir=output_dir, kwargs=kwargs, train=len(default_task(config).train_set))
        return {"table": "| table |"}

    monkeypatch.setattr(run_module, "run_comparison", fake_run)
    monkeypatch.setattr(logging.getLogger("flwr"), "level", logging.NOTSET)
    code, err = _cli(capsys, "--data", str(csv), "--text-column", "sentence", "--label-column", "y", "--val-size", "0",
                     "--test-size", "20", "--clients", "2", "--num-batches", "1", "--batch-size", "4",
                     "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    assert seen["train"] == 40 and seen["config"].val_size == 0 and seen["config"].text_column == "sentence"
    assert seen["kwargs"]["checkpoint_dir"] == str(tmp_path / "out" / ".checkpoints")
    assert seen["kwargs"]["quiet"] is True
    assert logging.getLogger("flwr").getEffectiveLevel() == logging.WARNING


def test_the_server_app_does_not_import_the_runner():
    """federated/run.py imports server_app.py; the reverse (for write_json) was an import cycle."""
    import ast

    import giva.federated.server_app as server_app

    tree = ast.parse(Path(server_app.__file__).read_text())
    imported = {(node.level, node.module) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert (1, "run") not in imported and (0, "giva.federated.run") not in imported


@pytest.mark.parametrize("bases_dtype", ["float32", "bfloat16"])
def test_a_client_model_records_the_dtype_its_bases_are_stored_in(bases_dtype):
    cfg = config(bases_dtype=bases_dtype)
    model = build_model(TinyTask(cfg), cfg)
    received = {k: torch.linalg.qr(torch.randn(a.shape[1], a.shape[0]))[0].mT.to(a.dtype)
                for k, a in read_bases(model).items()}
    apply_bases(model, received)
    info = model.peft_config["default"].bases_info
    assert info["dtype"] == bases_dtype and info["setup"] == "federated"
    assert all(a.dtype == getattr(torch, bases_dtype) for a in read_bases(model).values())


def test_a_shard_too_small_for_its_calibration_batches_stops_the_run_before_the_model_loads(monkeypatch):
    cfg = config(num_batches=5)  # 5 batches of 4 = 20 sentences; the smallest TinyTask shard holds 16
    monkeypatch.setattr("giva.federated.server_app.build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(ValueError) as raised:
        run_inprocess(cfg, TinyTask)
    assert str(raised.value) == (
        "data 'pang-lee' split over 3 clients gives a client 16 training sentences, fewer than its 5 calibration "
        "batches of 4 (20); use fewer clients, more training data, or a smaller --num-batches / --batch-size"
    )


class RowsTask(TinyTask):
    """TinyTask whose shard sizes are dealt from ``rows`` training sentences as the real task deals them."""

    rows = 2

    def shard_size(self, partition: int, num_partitions: int) -> int:
        return len(shard_indices([0] * self.rows, num_partitions, self.cfg.split, self.cfg.seed)[partition])


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_more_clients_than_sentences_stops_every_method_before_the_model_loads(method, monkeypatch, tmp_path):
    """LoRA and VeRA read no calibration batches, but a client still needs a sentence: refused before the model
    loads and before any checkpoint exists (one written there blocked the corrected command in that folder)."""
    cfg = config(method=method)  # 3 clients, 2 training sentences
    monkeypatch.setattr("giva.federated.server_app.build_model", lambda *a: pytest.fail("the model was built"))
    checkpoint = tmp_path / ".checkpoints" / f"{method}.pt"
    with pytest.raises(ValueError) as raised:
        run_inprocess(cfg, RowsTask, checkpoint=str(checkpoint))
    assert str(raised.value) == (
        "data 'pang-lee': 2 examples cannot be split over 3 clients; use fewer clients or more training data")
    assert not checkpoint.exists()


@pytest.mark.parametrize("method,task,message", [
    ("giva", TinyTask, "data 'pang-lee' split over 3 clients gives a client 16 training sentences, fewer than its 5 "
                       "calibration batches of 4 (20); use fewer clients, more training data, or a smaller "
                       "--num-batches / --batch-size"),
    ("lora", RowsTask, "data 'pang-lee': 2 examples cannot be split over 3 clients; use fewer clients or more training data"),
], ids=["giva", "lora"])
def test_data_too_small_is_refused_before_the_simulation_engine_starts(method, task, message, monkeypatch):
    """Under the simulation engine the data-size check runs before Flower's run_simulation (and Ray) starts, not
    only in the ServerApp inside it."""
    import flwr.simulation

    from giva.federated.run import run_federated

    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda *a, **k: pytest.fail("the simulation started"))
    with pytest.raises(ValueError) as raised:
        run_federated(config(method=method, num_batches=5), engine="simulation", task_factory=task)
    assert str(raised.value) == message


def test_quiet_libraries_restores_the_callers_logging_afterwards():
    import logging

    from transformers.utils import logging as hf_logging

    from giva.federated.run import LIBRARY_LOGGERS, quiet_libraries

    before = ({name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}, hf_logging.get_verbosity(),
              hf_logging.is_progress_bar_enabled())
    with quiet_libraries():
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert all(logging.getLogger(name).level >= logging.WARNING for name in LIBRARY_LOGGERS)
    after = ({name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}, hf_logging.get_verbosity(),
             hf_logging.is_progress_bar_enabled())
    assert after == before


def test_quiet_libraries_hides_alembic_info_and_flowers_deprecation_notice(caplog):
    """The simulation engine printed alembic's INFO "setup plugin" lines and Flower's run_simulation deprecation
    notice (twice: Flower's handler and the root one) though the docs say both are hidden. The filter sits on
    the "flwr" logger, so no handler of any logger gets the notice; Flower's other warnings still show."""
    import logging

    from flwr.common.logger import warn_deprecated_feature

    from giva.federated.run import quiet_libraries

    caplog.set_level(logging.INFO)  # the CLI's root level (logging.basicConfig(level=logging.INFO))
    flower = logging.getLogger("flwr")
    filters = list(flower.filters)
    with quiet_libraries():
        logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
        warn_deprecated_feature("The `run_simulation` function is deprecated")
        flower.warning("a warning of Flower's own")
        logging.getLogger("giva.federated.run").info("giva's own line")
    assert [r.getMessage() for r in caplog.records] == ["a warning of Flower's own", "giva's own line"]
    assert flower.filters == filters  # the filter leaves with the block


def test_the_committed_sampling_table_is_what_the_committed_results_give():
    """docs/federated.md quotes each accuracy's 95 % sampling half-width, 1.96 sqrt(p (1 - p) / n) in points, from
    benchmarks/results/federated/sampling.md: that file must be what the committed results.json files give."""
    from giva.federated.run import sampling_differences, sampling_half_width, sampling_rows, sampling_table

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "federated"
    assert (folder / "sampling.md").read_text() == sampling_table(sampling_rows(str(folder))) + "\n"
    assert sampling_half_width(0.76, 1000) == pytest.approx(2.647, abs=1e-3)
    assert sampling_half_width(0.8175, 400) == pytest.approx(3.786, abs=1e-3)
    iid_lora = next(d for d in sampling_differences(sampling_rows(str(folder))) if d["results"] == "iid" and d["versus"] == "lora")
    half = math.hypot(sampling_half_width(0.761, 1000), sampling_half_width(0.748, 1000))  # by hand: +1.3 +- 3.77
    assert iid_lora["difference_points"] == pytest.approx(1.3) and iid_lora["low"] == pytest.approx(1.3 - half)


def test_report_without_checkpoints_is_one_line_not_a_traceback(tmp_path, capsys):
    """The committed result folders hold no checkpoints (they are local): `run report` says so, exit 2."""
    from giva.federated.run import _main

    assert _main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoints in" in err[0] and "not committed" in err[0]


def test_report_of_a_folder_without_a_runs_checkpoint_is_one_line(tmp_path, capsys):
    """What counts as a run's checkpoint is report_checkpoints' call (giva/lora/vera), not any *.pt file."""
    from giva.federated.run import _main

    (tmp_path / ".checkpoints").mkdir()
    (tmp_path / ".checkpoints" / "notes.pt").write_bytes(b"")  # a .pt file that is no run's checkpoint
    assert _main(["report", str(tmp_path)]) == 2
    assert "no checkpoints in" in capsys.readouterr().err


def test_the_dense_setup_warns_of_a_gradient_of_lower_rank_than_r(caplog):
    """The federated dense setup takes the SVD of the summed gradient itself: three tokens give rank 3 at most (1 for
    the first layer's q_proj: the first token attends to itself alone, the last has no label), and its log says so
    for each such layer, as giva.initialize warns (it logged nothing)."""
    import logging

    from peft import get_peft_model

    from giva import GivaConfig

    config = GivaConfig(r=8, target_modules=["q_proj"], variant="Vr")
    model = get_peft_model(tiny_llama(), config)
    few = [{"input_ids": torch.tensor([[5, 17, 42]]), "labels": torch.tensor([[5, 17, 42]])}]
    with caplog.at_level(logging.WARNING, logger="giva.federated.statistics"):
        one_process_dense_bases(model, few, config)
    assert re.search(r"'model.layers.0.self_attn.q_proj' \(block 0: [1-3] of 8\).*fewer non-zero singular values",
                     caplog.text)
