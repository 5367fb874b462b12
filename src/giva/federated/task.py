"""The federated task: configuration, the clients' private shards, the models of each method, and the
local training / evaluation both sides run. Nothing here knows about Flower.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any, Optional, Protocol

import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from torch import nn

from ..bases import seeded_rng
from ..config import GivaConfig
from ..data import TextDataset
from ..finetune import ensure_pad_token, evaluate, parameter_groups
from ..init import DEFAULT_PASSES
from ..serving import BASES_DTYPES

METHODS: tuple[str, ...] = ("giva", "lora", "vera")
SPLITS: tuple[str, ...] = ("iid", "label-skew")
TASKS: tuple[str, ...] = ("classification", "causal-lm")
INIT_MODES: tuple[str, ...] = ("sketch", "dense")
# Learning rates chosen on validation in the centralised benchmark (benchmarks/README.md, task 1,
# all-linear rows): GiVA r=8 and VeRA r=64 0.08, LoRA r=8 0.001.
DEFAULT_LR = {"giva": 0.08, "lora": 0.001, "vera": 0.08}
# The setup's sketch: the library's default passes and width; the sums and test matrices travel in
# bfloat16, which halves the setup and moved the mean principal cosine of A by <= 1e-4
# (benchmarks/results/federated/sketch-small/, README "Federated fine-tuning").
SKETCH_PASSES = DEFAULT_PASSES
SKETCH_OVERSAMPLE = -1
SKETCH_DTYPE = "bfloat16"
SKETCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Run-config keys that are not part of the experiment (where the server writes its results and its checkpoint).
RUN_ONLY_KEYS = ("results-path", "checkpoint-path")
OPTIONAL_KEYS = ("lr", "max_train_samples")
# How the sizes of the calibration batches are named to the user: the options of `giva federated`, the run-config
# keys of `flwr run` / local_deployment.
CLI_BATCH_OPTIONS = "--num-batches / --batch-size"
RUN_CONFIG_BATCH_OPTIONS = "num-batches= / batch-size="


@dataclass
class FederatedConfig:
    """One federated run: who holds what, which adapter, how long to train."""

    clients: int = field(default=4, metadata={"help": "Number of simulated clients (SuperNodes), each with its own shard."})
    rounds: int = field(default=10, metadata={"help": "Training rounds after the setup round."})
    split: str = field(default="iid", metadata={"help": "'iid' (shuffled equal shards) or 'label-skew'."})
    skew: float = field(
        default=0.8, metadata={"help": "label-skew: share of each client's examples from its majority label (c mod L)."}
    )
    method: str = field(default="giva", metadata={"help": "'giva', 'lora' (r=lora_r) or 'vera' (r=vera_r)."})
    local_steps: int = field(default=5, metadata={"help": "Optimizer steps each client takes per round."})
    seed: int = field(default=0, metadata={"help": "Seed of the shards, the head, the bases and the sketches."})
    lr: Optional[float] = field(default=None, metadata={"help": "Peak learning rate; None: the method's DEFAULT_LR."})
    batch_size: int = field(default=16, metadata={"help": "Local batch size."})
    max_length: int = field(default=64, metadata={"help": "Tokens per sentence."})
    model: str = field(default="minilm", metadata={"help": "Model alias, folder or hub id (sequence classifier)."})
    task: str = field(
        default="classification",
        metadata={"help": "'classification' (a sequence classifier and its head) or 'causal-lm' (e.g. model=smollm2: "
                          "language-model loss on '<sentence> Sentiment: <label word>', scored by the label word)."},
    )
    data: str = field(default="pang-lee", metadata={"help": "Dataset (see giva.data.load_text_classification)."})
    text_column: str = field(default="text", metadata={"help": "Text column of a CSV/JSONL or hub dataset."})
    label_column: str = field(default="label", metadata={"help": "Label column of a CSV/JSONL or hub dataset."})
    test_size: int = field(default=1000, metadata={"help": "Held-out sentences the server evaluates on."})
    val_size: int = field(default=400, metadata={"help": "Validation sentences left out of every shard (unused here)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Cap on the pooled training sentences."})
    giva_r: int = field(default=8, metadata={"help": "GiVA rank."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (alpha = 2r)."})
    vera_r: int = field(default=64, metadata={"help": "VeRA rank."})
    target_modules: str = field(default="all-linear", metadata={"help": "Layers every method adapts."})
    init_mode: str = field(default="sketch", metadata={"help": "GiVA setup statistics: 'sketch' or 'dense' gradients."})
    oversample: int = field(
        default=SKETCH_OVERSAMPLE,
        metadata={"help": "Sketch columns beyond r (l = r + oversample); -1: the library default max(2r, 32)."},
    )
    passes: int = field(
        default=SKETCH_PASSES,
        metadata={"help": "Sketch passes (>= 2; each is one setup exchange; 2 = range + co-range, the fewest bytes)."},
    )
    sketch_dtype: str = field(
        default=SKETCH_DTYPE,
        metadata={"help": "dtype the sketch sums and test matrices travel in: 'float32' or 'bfloat16' (A keeps its own)."},
    )
    bases_dtype: str = field(
        default="float32",
        metadata={"help": "GiVA: the dtype the model stores A in (GivaConfig.bases_dtype), which is also the dtype A "
                          "travels in: 'float32' or 'bfloat16' (half the bytes of A down)."},
    )
    num_batches: int = field(default=4, metadata={"help": "Calibration batches per client in the setup round."})
    vera_projections: bool = field(
        default=True, metadata={"help": "VeRA: the setup message carries the shared projections (else only the seed)."}
    )

    def __post_init__(self) -> None:
        for name in ("clients", "rounds", "local_steps", "batch_size", "max_length", "test_size", "giva_r", "lora_r",
                     "vera_r", "num_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FederatedConfig.{name} must be a positive integer, got {value!r}")
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, int) or self.val_size < 0:
            raise ValueError(f"FederatedConfig.val_size must be an integer >= 0, got {self.val_size!r}")
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 2:
            raise ValueError(f"FederatedConfig.passes must be an integer >= 2, got {self.passes!r}")
        if isinstance(self.oversample, bool) or not isinstance(self.oversample, int) or self.oversample < -1:
            raise ValueError(f"FederatedConfig.oversample must be an integer >= 0 (or -1: library default), got {self.oversample!r}")
        if self.sketch_dtype not in SKETCH_DTYPES:
            raise ValueError(f"FederatedConfig.sketch_dtype must be one of {tuple(SKETCH_DTYPES)}, got {self.sketch_dtype!r}")
        if self.bases_dtype not in BASES_DTYPES:
            raise ValueError(f"FederatedConfig.bases_dtype must be one of {tuple(BASES_DTYPES)}, got {self.bases_dtype!r}")
        if self.task not in TASKS:
            raise ValueError(f"FederatedConfig.task must be one of {TASKS}, got {self.task!r}")
        if self.split not in SPLITS:
            raise ValueError(f"FederatedConfig.split must be one of {SPLITS}, got {self.split!r}")
        if self.method not in METHODS:
            raise ValueError(f"FederatedConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.init_mode not in INIT_MODES:
            raise ValueError(f"FederatedConfig.init_mode must be one of {INIT_MODES}, got {self.init_mode!r}")
        if isinstance(self.skew, bool) or not isinstance(self.skew, (int, float)) or not 0.0 < self.skew <= 1.0:
            raise ValueError(f"FederatedConfig.skew must be a number in (0, 1], got {self.skew!r}")
        if not isinstance(self.vera_projections, bool):  # a text 'False' is true, and sent the projections
            raise ValueError(f"FederatedConfig.vera_projections must be true or false, got {self.vera_projections!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not math.isfinite(self.lr) or self.lr <= 0):
            raise ValueError(f"FederatedConfig.lr must be a finite number > 0 or None, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"FederatedConfig.seed must be an integer >= 0, got {self.seed!r}")
        for name in ("text_column", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"FederatedConfig.{name} must be a non-empty column name, got {getattr(self, name)!r}")
        if self.max_train_samples is not None and (isinstance(self.max_train_samples, bool)
                                                   or not isinstance(self.max_train_samples, int)):
            raise ValueError(f"FederatedConfig.max_train_samples must be an integer or None, got {self.max_train_samples!r}")
        if self.max_train_samples is not None and self.max_train_samples < self.clients:
            raise ValueError(
                f"FederatedConfig.max_train_samples ({self.max_train_samples}) leaves fewer sentences than clients "
                f"({self.clients})"
            )

    @property
    def calibration_rows(self) -> int:
        """Sentences each client's setup reads: ``num_batches`` batches of ``batch_size``."""
        return self.num_batches * self.batch_size

    @property
    def sketch_oversampling(self) -> Optional[int]:
        """The oversampling given to ``giva.init.InitSession`` (None: the library default)."""
        return None if self.oversample == -1 else self.oversample

    @property
    def transport_dtype(self) -> torch.dtype:
        return SKETCH_DTYPES[self.sketch_dtype]

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def round_lr(self, round_index: int) -> float:
        """Linear decay over the rounds (round 1 trains at the peak LR, the last at 1/rounds of it)."""
        return self.peak_lr * (1.0 - (round_index - 1) / self.rounds)

    def to_flat(self) -> dict[str, Any]:
        """The config as Flower run-config values (kebab-case keys; None left out)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if v is not None}

    def same_run(self, saved: dict[str, Any]) -> bool:
        """True if ``saved`` (the ``asdict`` of a checkpointed run's config) is this config. A field the saved
        config lacks (added to this class after the checkpoint was written) counts as its default."""
        defaults = {f.name: f.default for f in fields(self)}
        return {**defaults, **saved} == asdict(self)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "FederatedConfig":
        """From Flower's run config (kebab-case keys; unknown keys are an error naming them)."""
        known = {f.name for f in fields(cls)}
        kwargs = {k.replace("-", "_"): v for k, v in values.items() if k not in RUN_ONLY_KEYS}
        for key in OPTIONAL_KEYS:  # TOML has no null: 0 stands for None (all sentences, the default LR)
            if kwargs.get(key) == 0:
                kwargs[key] = None
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown federated config key(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


def check_shards(per_client: int, config: FederatedConfig, what: str, options: str = CLI_BATCH_OPTIONS) -> None:
    """A ValueError unless a client's ``per_client`` training sentences hold its GiVA calibration batches
    (fewer would feed the same sentences to the setup as several calibration batches). ``options``: what the
    message tells the user to make smaller, in the terms of the tool they ran."""
    if per_client < config.calibration_rows:
        raise ValueError(
            f"{what} gives a client {per_client} training sentences, fewer than its {config.num_batches} calibration "
            f"batches of {config.batch_size} ({config.calibration_rows}); use fewer clients, more training data, or "
            f"a smaller {options}"
        )


def shard_indices(labels: list[int], clients: int, split: str, seed: int, skew: float = 0.8) -> list[list[int]]:
    """Disjoint, near-equal shards of ``range(len(labels))``.

    ``iid``: a seeded shuffle dealt round-robin. ``label-skew``: client ``c`` draws a ``skew`` share of
    its ``len / clients`` examples from label ``c mod L`` and the rest from the other labels (as far as
    they last), so label mixes differ across clients while sizes stay equal.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = len(labels)
    if n < clients:
        raise ValueError(f"{n} examples cannot be split over {clients} clients")
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    if split == "iid":
        return [sorted(order[c::clients]) for c in range(clients)]
    num_labels = max(labels) + 1
    pools = {label: [i for i in order if labels[i] == label] for label in range(num_labels)}
    sizes = [n // clients + (1 if c < n % clients else 0) for c in range(clients)]
    shards: list[list[int]] = [[] for _ in range(clients)]
    for c in range(clients):  # majority share first, while every pool still has it
        take = min(int(round(skew * sizes[c])), len(pools[c % num_labels]))
        shards[c] = [pools[c % num_labels].pop() for _ in range(take)]
    rest = [i for label in range(num_labels) for i in pools[label]]
    rng.shuffle(rest)
    for c in range(clients):
        need = sizes[c] - len(shards[c])
        shards[c] += rest[:need]
        rest = rest[need:]
    return [sorted(s) for s in shards]


class Task(Protocol):
    """What the server and the clients need from a task (a real one, or a tiny one in the tests)."""

    num_labels: int

    def base_model(self) -> nn.Module: ...

    def train_batches(self, partition: int, num_partitions: int, round_index: int) -> Iterator[dict[str, torch.Tensor]]: ...

    def calibration_batches(self, partition: int, num_partitions: int, num_batches: int) -> list[dict[str, torch.Tensor]]: ...

    def shard_size(self, partition: int, num_partitions: int) -> int: ...

    def test_batches(self) -> list[dict[str, torch.Tensor]]: ...


def cycle_batches(rows: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless seeded shuffled passes over ``rows`` in batches (the last short batch of a pass is dropped
    unless it is the only one)."""
    rng = random.Random(seed)
    while True:
        order = list(rows)
        rng.shuffle(order)
        full = max(1, len(order) // batch_size)
        for b in range(full):
            yield order[b * batch_size : (b + 1) * batch_size]


class TextClassificationTask:
    """Sentence classification (default: MiniLM on Pang & Lee) with private shards of the training split."""

    def __init__(self, config: FederatedConfig) -> None:
        from transformers import AutoTokenizer

        from ..assets import resolve_model
        from ..data import deduplicate, load_text_classification, split_dataset

        self.config = config
        dataset = load_text_classification(config.data, config.text_column, config.label_column)
        # The partition of `giva finetune` (deduplicated; 2600 / 400 / 1000 on Pang & Lee at the defaults): the
        # validation rows are left out, nothing is chosen on the evaluation split the server scores.
        train, _, test = split_dataset(deduplicate(dataset), test_size=config.test_size, val_size=config.val_size, seed=0)
        if config.max_train_samples is not None:
            train = train.subset(list(range(min(config.max_train_samples, len(train)))))
        self.train_set: TextDataset = train
        self.test_set: TextDataset = test
        self.num_labels = dataset.num_labels
        self.model_path = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._encoded = self.tokenizer(train.texts, truncation=True, max_length=config.max_length)

    def _collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        features = [{k: self._encoded[k][i] for k in self._encoded.keys()} for i in rows]
        padded = self.tokenizer.pad(features, return_tensors="pt")
        return {**padded, "labels": torch.tensor([self.train_set.labels[i] for i in rows])}

    def _shard(self, partition: int, num_partitions: int) -> list[int]:
        if not 0 <= partition < num_partitions:
            raise ValueError(f"partition-id {partition} is not in [0, {num_partitions})")
        cfg = self.config
        return shard_indices(self.train_set.labels, num_partitions, cfg.split, cfg.seed, cfg.skew)[partition]

    def base_model(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(self.config.seed)  # the fresh head: the same on the server and every client
        return AutoModelForSequenceClassification.from_pretrained(self.model_path, num_labels=self.num_labels).eval()

    def shard_size(self, partition: int, num_partitions: int) -> int:
        return len(self._shard(partition, num_partitions))

    def train_batches(self, partition: int, num_partitions: int, round_index: int) -> Iterator[dict[str, torch.Tensor]]:
        seed = self.config.seed * 1_000_003 + round_index * 1_009 + partition
        for rows in cycle_batches(self._shard(partition, num_partitions), self.config.batch_size, seed):
            yield self._collate(rows)

    def calibration_batches(self, partition: int, num_partitions: int, num_batches: int) -> list[dict[str, torch.Tensor]]:
        batches = self.train_batches(partition, num_partitions, round_index=0)
        return [next(batches) for _ in range(num_batches)]

    def pooled_batches(self, round_index: int = 0, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The union of the shards as one loader (the centralised baseline), from its ``skip``-th batch on."""
        rows_iter = cycle_batches(list(range(len(self.train_set))), self.config.batch_size, self.config.seed + round_index)
        for index, rows in enumerate(rows_iter):
            if index >= skip:
                yield self._collate(rows)

    def test_batches(self) -> list[dict[str, torch.Tensor]]:
        encoded = self.tokenizer(self.test_set.texts, truncation=True, max_length=self.config.max_length)
        out = []
        for start in range(0, len(self.test_set), 64):
            rows = range(start, min(start + 64, len(self.test_set)))
            padded = self.tokenizer.pad([{k: encoded[k][i] for k in encoded.keys()} for i in rows], return_tensors="pt")
            out.append({**padded, "labels": torch.tensor([self.test_set.labels[i] for i in rows])})
        return out


CANDIDATES = "candidates"


def check_causal_lm(model: str) -> None:
    """A ValueError unless ``model``'s config names a causal-LM architecture (reads the config, not the weights):
    an encoder would get a freshly initialised LM head and train it from nothing."""
    from transformers import AutoConfig

    from ..assets import resolve_model

    architectures = getattr(AutoConfig.from_pretrained(resolve_model(model)), "architectures", None) or []
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        raise ValueError(
            f"task 'causal-lm' needs a causal language model, but model {model!r} is {architectures or 'of no known architecture'} "
            "(an encoder would train a random LM head); use e.g. --model smollm2, or --task classification"
        )
LABEL_WORDS = {"pang-lee": ("negative", "positive")}


class CausalLMTask(TextClassificationTask):
    """The same shards as a causal-LM task: each client trains on ``"<sentence> Sentiment: <word>"`` with
    the language-model loss on every token (no head: only GiVA's vectors travel), and the server scores the
    held-out prompts ``"<sentence> Sentiment:"`` by which label word's first token the model ranks higher."""

    def __init__(self, config: FederatedConfig) -> None:
        check_causal_lm(config.model)
        super().__init__(config)
        ensure_pad_token(self.tokenizer, where=config.model)
        self.tokenizer.padding_side = "right"
        # A sentence too long for max_length loses its start, not the " Sentiment: <word>" its row ends with (cut
        # from the right, a training row lost its label word and a test prompt was scored mid-sentence).
        self.tokenizer.truncation_side = "left"
        words = LABEL_WORDS.get(config.data, tuple(str(i) for i in range(self.num_labels)))
        self.candidates = torch.tensor([self.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words])
        if len(set(self.candidates.tolist())) != len(words):
            raise ValueError(f"the label words {words} share their first token under this tokenizer")
        texts = [f"{t} Sentiment: {words[y]}" for t, y in zip(self.train_set.texts, self.train_set.labels)]
        self._encoded = self.tokenizer(texts, truncation=True, max_length=config.max_length)
        self._words = words

    def _collate(self, rows: list[int]) -> dict[str, torch.Tensor]:
        features = [{k: self._encoded[k][i] for k in ("input_ids", "attention_mask")} for i in rows]
        padded = self.tokenizer.pad(features, return_tensors="pt")
        return {**padded, "labels": padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)}

    def base_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()

    def test_batches(self) -> list[dict[str, torch.Tensor]]:
        prompts = [f"{t} Sentiment:" for t in self.test_set.texts]
        encoded = self.tokenizer(prompts, truncation=True, max_length=self.config.max_length)
        out = []
        for start in range(0, len(prompts), 64):
            rows = range(start, min(start + 64, len(prompts)))
            padded = self.tokenizer.pad([{k: encoded[k][i] for k in ("input_ids", "attention_mask")} for i in rows],
                                        return_tensors="pt")
            out.append({**padded, "labels": torch.tensor([self.test_set.labels[i] for i in rows]),
                        CANDIDATES: self.candidates})
        return out


def _candidate_accuracy(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            mask = batch["attention_mask"]
            logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
            last = logits[torch.arange(len(mask)), mask.sum(-1) - 1]  # right padding: the prompt's last token
            picked = last[:, batch[CANDIDATES]].argmax(-1)
            correct += int((picked == batch["labels"]).sum())
            total += len(mask)
    return correct / total


@lru_cache(maxsize=2)
def cached_task(config_items: tuple[tuple[str, Any], ...]) -> TextClassificationTask:
    """One task per process and config: a simulated client keeps its tokenised shard between rounds."""
    config = FederatedConfig(**dict(config_items))
    return CausalLMTask(config) if config.task == "causal-lm" else TextClassificationTask(config)


def peft_config(config: FederatedConfig, method: Optional[str] = None) -> Any:
    """The adapter of ``method`` on ``config.target_modules`` (the same layers for every method)."""
    method = method or config.method
    task_type = "CAUSAL_LM" if config.task == "causal-lm" else "SEQ_CLS"
    targets = config.target_modules if config.target_modules == "all-linear" else config.target_modules.split(",")
    if method == "giva":
        return GivaConfig(r=config.giva_r, target_modules=targets, seed=config.seed, task_type=task_type,
                          bases_dtype=config.bases_dtype)
    if method == "lora":
        return LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0, target_modules=targets,
                          task_type=task_type)
    if method == "vera":
        return VeraConfig(r=config.vera_r, target_modules=targets, projection_prng_key=config.seed, d_initial=0.1,
                          vera_dropout=0.0, save_projection=config.vera_projections, task_type=task_type)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def build_model(task: Task, config: FederatedConfig) -> PeftModel:
    """The base model with ``config.method``'s adapter; LoRA's A is seeded so server and clients agree
    (in a forked RNG state: the caller's random stream is left as it was)."""
    with seeded_rng(config.seed):
        return get_peft_model(task.base_model(), peft_config(config))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a round exchanges: every trainable parameter (adapter vectors / factors and the head)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; the names must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        diff = sorted(set(params) ^ set(state))
        raise ValueError(f"trainable tensors do not match the model's: {diff[:4]} ({len(diff)} differ)")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def projection_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """VeRA's shared random projections (``vera_A`` / ``vera_B``), as the setup message carries them."""
    out = {}
    for name, buf in model.named_buffers():
        if ".vera_A." in f".{name}." or ".vera_B." in f".{name}.":
            out[name] = buf.detach().clone()
    if not out:
        raise ValueError("the model holds no VeRA projections")
    return out


def load_projection_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in state.items():
            if name not in buffers:
                raise ValueError(f"VeRA projection {name!r} does not exist in this model")
            buffers[name].copy_(value)


def client_seed(seed: int, round_index: int, partition: int) -> int:
    """The seed of one client's local training in one round (its dropout masks), from the run seed alone."""
    return ((seed * 1_000_003 + round_index) * 1_000_003 + partition) % 2**63  # in torch.manual_seed's range


def local_train(
    model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], steps: int, lr: float, seed: int
) -> list[float]:
    """``steps`` AdamW steps (fresh optimizer, constant LR, grad-norm clip 1) on the client's batches.

    ``seed`` seeds the random draws of training (dropout) inside a forked RNG state, so a client's round
    is a function of its inputs, not of what else ran in the process before it (the other virtual
    clients of a simulation worker, a resumed run's fresh process) and the caller's RNG is left as it was.
    """
    optimizer = torch.optim.AdamW(parameter_groups(model, lr, None, 0.0))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = []
    with seeded_rng(seed, tuple({p.device for p in params})):
        model.train()
        try:
            for _ in range(steps):
                loss = model(**next(batches)).loss
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"local training diverged: loss {loss.item()}")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
        finally:
            model.eval()
    broken = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if broken:  # a finite loss, then an inf gradient clipped to NaN: the reply would poison the server's average
        raise FloatingPointError(f"local training diverged: non-finite values in {broken[:3]} after {steps} steps")
    return losses


def accuracy(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of correct labels: ``argmax`` of a classifier's logits, or, for batches with ``candidates``
    (the first token of each label word, causal LMs), the candidate with the larger next-token logit
    after each prompt's last token."""
    if batches and CANDIDATES in batches[0]:
        return _candidate_accuracy(model, batches)
    return evaluate(model, batches)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Example-weighted mean ``sum_c n_c x_c / sum_c n_c`` of each tensor (computed in float64)."""
    if not states or len(states) != len(weights):
        raise ValueError(f"fedavg needs one weight per state, got {len(states)} states and {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise ValueError(f"fedavg weights (example counts) must be positive, got {weights}")
    total = float(sum(weights))
    out = {}
    for name, first in states[0].items():
        acc = torch.zeros_like(first, dtype=torch.float64)
        for state, weight in zip(states, weights):
            acc += state[name].double() * weight
        out[name] = (acc / total).to(first.dtype)
    return out
