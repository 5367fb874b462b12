"""Method, task and suite specifications of `giva bench`, read from the JSON files under benchmarks/.

A *method* is one named, versioned adapter config (benchmarks/methods/<name>.json); a *suite*
(benchmarks/suites/<name>.json) names the tasks and the phases to run. Everything that is not
the adapter config (model, split, tokenisation, batch size, epochs, schedule, seeds) lives in
the suite and is shared by every method in it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..bases import GRADIENT_VARIANTS, SEEDED_B_VARIANTS
from ..init.session import STATISTICS  # GiVA's init.statistic: what A is taken from
from .stats import CONFIDENCE, MIN_SEEDS, claim_test, split_ref

METHOD_KINDS = ("none", "floor", "probe", "full", "peft", "osora")
UNTRAINED_KINDS = ("none", "floor")
PHASE_KINDS = ("train", "speed")
LR_RULES = ("sweep", "best", "default", "adaptive", "runner-up")
# GiVA's gradient: taken on the model as the task loads it, or ("unquantised") on the same weights loaded without
# the task's quantisation, the bases then copied onto the quantised model that trains
BASES_FROM = ("task", "unquantised")
HEAD_LR_RULES = ("same", "probe")  # or a number: one head LR shared by every method
# init.grow_rows: A from the gradient (held back, then grown) and B seeded (nothing of B to grow)
GROWABLE_VARIANTS = tuple(v for v in GRADIENT_VARIANTS if v in SEEDED_B_VARIANTS)
DEFAULT_HEADLINE_PAIRS = (("giva-r8", "vera-r64"), ("giva-r32", "vera-r256"))
DEFAULT_HEADLINE_SIZES = ("giva-r8", "giva-r32", "lora-r8", "vera-r64", "vera-r256")


def _check_head_warmup(where: str, init: dict[str, Any]) -> None:
    """``init.head_warmup_epochs`` (GiVA: passes of head-only training before the gradient, LP-FT's first stage) must
    be a positive int; ``init.bases_before_warmup`` (the control: the gradient first, then the same warm-up) a bool."""
    epochs = init.get("head_warmup_epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"{where}: init.head_warmup_epochs must be a positive integer, got {epochs!r}")
    before = init.get("bases_before_warmup", False)
    if not isinstance(before, bool) or (before and epochs is None):
        raise ValueError(f"{where}: init.bases_before_warmup must be true or false, and needs init.head_warmup_epochs, got {before!r}")


@dataclass(frozen=True)
class MethodSpec:
    """One adapter config. ``kind``: 'none' (the pretrained model, evaluated untrained: the floor of a
    generative task), 'floor' (speed phases only: the frozen model with a full backward to its inputs and
    no adapter, a step time no adapter can beat), 'probe' (head only), 'full', 'peft' (stock PEFT or
    GiVA) or 'osora'."""

    name: str
    version: int
    family: str
    kind: str
    lr: float
    lr_sweep: tuple[float, ...]
    peft_type: Optional[str] = None  # LORA, VERA or GIVA for kind 'peft'; GIVA ('weight' bases) for 'osora'
    peft_kwargs: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)  # num_batches (GiVA k), bases_from (GiVA), loraga_batches
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of this method (e.g. lr_scales)
    rank: Optional[int] = None
    description: str = ""

    def targets(self, task_default: Sequence[str]) -> list[str] | str:
        """The layers this method adapts: its own ``target_modules`` (a list, or 'all-linear'), else the
        task's default; none for the kinds that add no adapter."""
        if self.kind not in ("peft", "osora"):
            return []
        own = self.peft_kwargs.get("target_modules")
        if own is None:
            return list(task_default)
        return own if isinstance(own, str) else list(own)

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {METHOD_KINDS}, got {self.kind!r}")
        if self.kind in ("peft", "osora") and not self.peft_type:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} needs a peft_type")
        if self.kind not in UNTRAINED_KINDS and (self.lr <= 0 or any(lr <= 0 for lr in self.lr_sweep) or not self.lr_sweep):
            raise ValueError(f"method {self.name!r}: lr and a non-empty lr_sweep of positive values are required")
        if self.init.get("bases_from", BASES_FROM[0]) not in BASES_FROM:
            raise ValueError(f"method {self.name!r}: init.bases_from must be one of {BASES_FROM}, got {self.init['bases_from']!r}")
        _check_head_warmup(f"method {self.name!r}", self.init)
        if self.init.get("statistic", "mean") not in STATISTICS:
            raise ValueError(f"method {self.name!r}: init.statistic must be one of {STATISTICS}, got {self.init['statistic']!r}")
        self.grow()

    def grow(self) -> Optional[tuple[int, float]]:
        """``(rows, at)`` of ``init.grow_rows`` / ``init.grow_at`` (gap candidate (h): that many rows of A held back at
        initialisation and grown after that fraction of the training steps, :mod:`giva.bench.grow`), or None without
        them. ``ValueError`` naming the field: ``rows`` an integer in [1, r - 1], ``at`` a fraction in (0, 1)."""
        rows, at = self.init.get("grow_rows"), self.init.get("grow_at")
        if rows is None and at is None:
            return None
        if self.peft_type != "GIVA" or self.peft_kwargs.get("variant", "Vr") not in GROWABLE_VARIANTS:
            raise ValueError(f"method {self.name!r}: init.grow_rows needs a GiVA method with a variant in {GROWABLE_VARIANTS}")
        rank = int(self.peft_kwargs.get("r", 8))  # GivaConfig's default r
        if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows < rank:
            raise ValueError(f"method {self.name!r}: init.grow_rows must be an integer in [1, r - 1] = [1, {rank - 1}], got {rows!r}")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 < at < 1:
            raise ValueError(f"method {self.name!r}: init.grow_at must be a fraction of the training steps in (0, 1), got {at!r}")
        return rows, float(at)

    def with_overrides(self, peft: dict[str, Any], init: dict[str, Any]) -> "MethodSpec":
        """The same method with some PEFT / initialisation settings replaced (an ablation)."""
        kwargs = {**copy.deepcopy(self.peft_kwargs), **peft}
        rank = kwargs.get("r", self.rank)
        return MethodSpec(
            self.name, self.version, self.family, self.kind, self.lr, self.lr_sweep, self.peft_type, kwargs,
            {**self.init, **init}, self.train, rank, self.description,
        )


QUANTIZATIONS = (None, "nf4")  # a task's base model: as stored, or 4-bit NF4 through bitsandbytes


@dataclass(frozen=True)
class TaskSpec:
    """Model + data + fixed split + tokenisation: everything a run shares except the adapter."""

    name: str
    model: str
    data: str
    kind: str = "classification"  # or 'clm' (instruction -> label, causal LM loss)
    target_modules: tuple[str, ...] = ("query", "value")
    test_size: int = 1000
    val_size: int = 400
    max_train_samples: Optional[int] = None
    max_length: int = 64
    batch_size: int = 16
    split_seed: int = 0
    prompt: str = "Review: {text}\nSentiment:"
    label_words: tuple[str, ...] = ("negative", "positive")  # a causal-LM task's answer per label, in label order
    dedupe: bool = True  # drop repeated sentences (case-folded, whitespace collapsed) before splitting
    epochs: Optional[float] = None  # overrides the suite's training epochs for this task (a longer schedule)
    quantization: Optional[str] = None  # 'nf4': the base loaded in 4-bit (QLoRA's recipe; see methods.load_base)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_words", tuple(self.label_words))  # a suite JSON gives a list
        if self.kind == "clm" and (len(set(self.label_words)) != len(self.label_words) or not all(
            isinstance(w, str) and w.strip() == w and w for w in self.label_words
        )):
            raise ValueError(
                f"task {self.name!r}: label_words must be distinct non-empty words without surrounding spaces, "
                f"got {list(self.label_words)!r}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"task {self.name!r}: quantization must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}"
            )


@dataclass(frozen=True)
class Ablation:
    tag: str
    peft: dict[str, Any] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    """A block of runs: methods x seeds x LRs.

    ``lr``: 'sweep' (every LR of the method's lr_sweep), 'best' (from the seed-0 sweep), 'default', or
    'adaptive': each row sweeps ``centre x lr_factors`` on ``sweep_seeds`` (centre: the method's LR, or
    the LR chosen on ``lr_from_task``), keeps adding ``centre / lr_step`` or ``x lr_step`` while the best
    mean validation accuracy sits strictly at an edge (at most ``max_lr_extensions`` times), then runs
    the chosen LR on every seed of ``seeds``. 'runner-up': each row (settled by the suite's 'adaptive' phase of that
    task, method and ablation) runs its runner-up validation LR on every seed of ``seeds``, so that the report's
    runner-up variants of a claim pair get the seeds a verdict needs (:func:`giva.bench.runner.runner_up_row`).
    """

    name: str
    task: str
    methods: tuple[str, ...]
    kind: str = "train"
    seeds: tuple[int, ...] = (0,)
    lr: str = "sweep"
    ablations: tuple[Ablation, ...] = ()
    lr_from_task: Optional[str] = None  # 'best' LR taken from this task's sweep (default: the phase's task)
    lr_factors: tuple[float, ...] = (1.0,)  # with lr 'best' or 'default': run that LR times each factor
    sweep_seeds: tuple[int, ...] = (0,)  # 'adaptive': the seeds every LR runs (chosen on their mean)
    lr_step: float = 2.0  # 'adaptive': the factor of each extension beyond an edge
    max_lr_extensions: int = 4  # 'adaptive': at most this many LRs added per row
    steps: int = 30  # speed phases
    warmup_steps: int = 5

    def __post_init__(self) -> None:
        if self.kind not in PHASE_KINDS:
            raise ValueError(f"phase {self.name!r}: kind must be one of {PHASE_KINDS}, got {self.kind!r}")
        if self.lr not in LR_RULES:
            raise ValueError(f"phase {self.name!r}: lr must be one of {LR_RULES}, got {self.lr!r}")
        if not self.lr_factors or any(f <= 0 for f in self.lr_factors):
            raise ValueError(f"phase {self.name!r}: lr_factors must be positive numbers, got {self.lr_factors!r}")
        if self.lr == "adaptive" and (self.lr_step <= 1 or not self.sweep_seeds or self.max_lr_extensions < 0):
            raise ValueError(f"phase {self.name!r}: 'adaptive' needs lr_step > 1, sweep_seeds and max_lr_extensions >= 0")
        if self.lr == "sweep" and tuple(self.lr_factors) != (1.0,):
            raise ValueError(f"phase {self.name!r}: lr_factors apply to lr 'best' or 'default', not 'sweep'")


@dataclass(frozen=True)
class Comparison:
    """A difference the report states beside the claims: the paired interval of sum(``plus`` rows) - sum(``minus``
    rows) test accuracy, each row ``'task/method'`` or ``'task/method:ablation'`` at its chosen LR."""

    what: str
    plus: tuple[str, ...]
    minus: tuple[str, ...]

    def __post_init__(self) -> None:
        for ref in (*self.plus, *self.minus):
            try:
                split_ref(ref)
            except ValueError as error:
                raise ValueError(f"comparison {self.what!r}: {error}") from None
        if not self.plus or not self.minus:
            raise ValueError(f"comparison {self.what!r} needs rows in both 'plus' and 'minus'")


SECOND_LOOK_TESTS = ("non-inferior", "better")  # accuracy pairs: the ones more seeds can decide


@dataclass(frozen=True)
class SecondLook:
    """More seeds for claims the first look (the suite's claims, 5 seeds) left undecided, declared before their runs:
    each row of a pair joined with its ``seeds_tag`` ablation row (the same method at the same LR on further seeds),
    decided at ``confidence`` over at least ``min_seeds`` seeds (:func:`giva.bench.stats.evaluate_second_look`)."""

    declared: str  # when, and that it came before the runs
    why: str
    seeds_tag: str
    min_seeds: int
    confidence: float
    claims: tuple[dict[str, Any], ...]

    def __post_init__(self) -> None:
        where = "second_look"
        if not self.declared or not self.why or not self.seeds_tag:
            raise ValueError(f"{where}: 'declared', 'why' and 'seeds_tag' must be non-empty")
        if isinstance(self.min_seeds, bool) or not isinstance(self.min_seeds, int) or self.min_seeds <= MIN_SEEDS:
            raise ValueError(f"{where}.min_seeds must be an integer above the first look's {MIN_SEEDS} seeds, got {self.min_seeds!r}")
        if not isinstance(self.confidence, float) or not CONFIDENCE <= self.confidence < 1:
            raise ValueError(f"{where}.confidence must be a number in [{CONFIDENCE}, 1), got {self.confidence!r}")
        if not self.claims:
            raise ValueError(f"{where}.claims must name at least one claim")
        for claim in self.claims:
            name = claim.get("claim")
            try:
                test = claim_test(claim.get("test", ""))
            except ValueError as error:
                raise ValueError(f"{where} claim {name!r}: {error}") from None
            if test not in SECOND_LOOK_TESTS:
                raise ValueError(f"{where} claim {name!r}: test {test!r} is not an accuracy test; a second look adds seeds "
                                 f"to accuracy pairs only ({SECOND_LOOK_TESTS})")
            if not name or not claim.get("pairs") or any(len(pair) != 2 for pair in claim["pairs"]):
                raise ValueError(f"{where} claim {name!r} needs a name and 'pairs' of two rows each")
            for ref in (ref for pair in claim["pairs"] for ref in pair):
                if split_ref(ref)[2] is not None:
                    raise ValueError(f"{where} claim {name!r}: row {ref!r} names an ablation; name the first look's row, "
                                     f"its {self.seeds_tag!r} row is joined to it")


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    version: int
    description: str
    tasks: dict[str, TaskSpec]
    train: dict[str, Any]  # shared TrainConfig fields (epochs, warmup_ratio, weight_decay, head_lr rule ...)
    phases: tuple[Phase, ...]
    headline_task: str
    threads: int = 2
    # (a, b) method pairs compared in the headline lines (paired per-seed test-accuracy difference a - b)
    headline_pairs: tuple[tuple[str, str], ...] = DEFAULT_HEADLINE_PAIRS
    headline_sizes: tuple[str, ...] = DEFAULT_HEADLINE_SIZES
    claims: tuple[dict[str, Any], ...] = ()  # the paper's claims and the row pairs that decide them (see stats.py)
    comparisons: tuple[Comparison, ...] = ()  # further differences the report states, with their intervals
    end_to_end: Optional[tuple[str, str]] = None  # (a, b) methods: a's init + training time over b's, per task
    second_look: Optional[SecondLook] = None  # more seeds for undecided claims, declared before their runs

    def __post_init__(self) -> None:
        head_lr = self.train.get("head_lr", "same")
        if not (head_lr in HEAD_LR_RULES or (isinstance(head_lr, (int, float)) and head_lr > 0)):
            raise ValueError(f"suite {self.name!r}: train.head_lr must be one of {HEAD_LR_RULES} or a positive number, got {head_lr!r}")
        if self.second_look is not None:
            tags = {a.tag for p in self.phases for a in p.ablations}
            if self.second_look.seeds_tag not in tags:
                raise ValueError(f"suite {self.name!r}: second_look.seeds_tag {self.second_look.seeds_tag!r} is no phase's "
                                 f"ablation tag; the further seeds run as that ablation")
            for ref in dict.fromkeys(ref for c in self.second_look.claims for pair in c["pairs"] for ref in pair):
                self._check_second_look_row(ref)

    def _check_second_look_row(self, ref: str) -> None:
        """Before any run: a second-look row has a first-look phase and one phase with the look's tag that runs it at
        the first look's LR (``lr_factors`` [1.0] around ``lr_from_task`` = its own task, no extension) on seeds the
        first look did not run, enough of them together for ``min_seeds``."""
        look, (task, method, _) = self.second_look, split_ref(ref)
        where = f"suite {self.name!r}: second_look row {ref!r}"
        if task not in self.tasks:
            raise ValueError(f"{where} names no task of the suite ({sorted(self.tasks)})")
        first = next((p for p in self.phases if p.lr == "adaptive" and p.task == task and method in p.methods and not p.ablations), None)
        tagged = [p for p in self.phases if p.task == task and method in p.methods and any(a.tag == look.seeds_tag for a in p.ablations)]
        if first is None or len(tagged) != 1:
            raise ValueError(f"{where} needs one adaptive phase that runs it and one phase with the ablation tag "
                             f"{look.seeds_tag!r} that runs {method} on {task}; found {0 if first is None else 1} and {len(tagged)}")
        more = tagged[0]
        if more.lr != "adaptive" or more.lr_factors != (1.0,) or more.max_lr_extensions != 0 or more.lr_from_task != task:
            raise ValueError(f"phase {more.name!r} must run {ref}'s first-look LR: lr 'adaptive', lr_factors [1.0], "
                             f"max_lr_extensions 0 and lr_from_task {task!r}")
        if set(more.seeds) & set(first.seeds) or len(set(more.seeds) | set(first.seeds)) < look.min_seeds:
            raise ValueError(f"phase {more.name!r} must run seeds that phase {first.name!r} did not ({list(first.seeds)}), "
                             f"{look.min_seeds} with them; it runs {list(more.seeds)}")


def benchmarks_dir(start: Optional[Path] = None) -> Path:
    """The benchmarks/ folder: ``$GIVA_BENCH_DIR``, else the first ``benchmarks/suites`` above the cwd."""
    if os.environ.get("GIVA_BENCH_DIR"):
        return Path(os.environ["GIVA_BENCH_DIR"])
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "benchmarks" / "suites").is_dir():
            return folder / "benchmarks"
    raise FileNotFoundError(
        "no benchmarks/suites folder found above the current directory; run from a source checkout or set GIVA_BENCH_DIR"
    )


def _read_config(root: Path, folder: str, name: str) -> dict[str, Any]:
    """``root/folder/name.json``; a missing file names the folder's known configs."""
    path = root / folder / f"{name}.json"
    if not path.exists():
        known = sorted(p.stem for p in (root / folder).glob("*.json"))
        raise FileNotFoundError(f"no {folder} config {path}; known {folder}: {known}")
    return json.loads(path.read_text())


def load_method(root: Path, name: str) -> MethodSpec:
    raw = _read_config(root, "methods", name)
    raw.setdefault("lr", 0.0)  # kind 'none' trains nothing
    raw["lr_sweep"] = tuple(raw.get("lr_sweep", [raw["lr"]]))
    raw.setdefault("rank", raw.get("peft_kwargs", {}).get("r"))
    return MethodSpec(**raw)


def load_suite(root: Path, name: str) -> SuiteSpec:
    raw = _read_config(root, "suites", name)
    tasks = {
        key: TaskSpec(name=key, **{**t, "target_modules": tuple(t.get("target_modules", ("query", "value")))})
        for key, t in raw["tasks"].items()
    }
    phases = []
    for p in raw["phases"]:
        ablations = tuple(Ablation(**a) for a in p.get("ablations", ()))
        phases.append(
            Phase(**{**p, "methods": tuple(p["methods"]), "seeds": tuple(p.get("seeds", (0,))), "ablations": ablations,
                     "lr_factors": tuple(float(f) for f in p.get("lr_factors", (1.0,))),
                     "sweep_seeds": tuple(p.get("sweep_seeds", (0,)))})
        )
    for phase in phases:
        if phase.task not in tasks:
            raise ValueError(f"suite {name!r}: phase {phase.name!r} names unknown task {phase.task!r}")
    return SuiteSpec(
        name=raw["name"], version=raw["version"], description=raw.get("description", ""), tasks=tasks,
        train=raw.get("train", {}), phases=tuple(phases), headline_task=raw.get("headline_task", next(iter(tasks))),
        threads=raw.get("threads", 2),
        headline_pairs=tuple(tuple(pair) for pair in raw.get("headline_pairs", DEFAULT_HEADLINE_PAIRS)),
        headline_sizes=tuple(raw.get("headline_sizes", DEFAULT_HEADLINE_SIZES)),
        claims=tuple(raw.get("claims", ())),
        comparisons=tuple(
            Comparison(c["what"], tuple(c["plus"]), tuple(c["minus"])) for c in raw.get("comparisons", ())
        ),
        end_to_end=tuple(raw["end_to_end"]) if raw.get("end_to_end") else None,
        second_look=_second_look(raw.get("second_look")),
    )


def _second_look(raw: Optional[dict[str, Any]]) -> Optional[SecondLook]:
    if raw is None:
        return None
    fields = {f.name for f in dataclasses.fields(SecondLook)}
    if not isinstance(raw, dict) or set(raw) != fields:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"second_look must be an object with exactly the keys {sorted(fields)}, got {got}")
    return SecondLook(**{**raw, "claims": tuple(raw["claims"])})
