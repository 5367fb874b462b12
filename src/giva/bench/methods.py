"""Build the model of one benchmark method: linear probe, full fine-tuning, stock PEFT, GiVA or OSoRA.

Every method starts from the same pretrained weights and the same freshly initialised head
(``torch.manual_seed(seed)`` right before loading); only the adapter differs. Initialisation work
that a method needs before its first step (GiVA's gradient + SVD, LoRA-GA's gradient, PiSSA's and
OSoRA's SVD of W) is timed separately from training.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from itertools import islice
from typing import Any, Optional

import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ..config import GivaConfig
from ..finetune import ensure_pad_token, is_head_parameter
from ..init import initialize
from ..layer import GivaLayer
from ..quant import keep_4bit_layers_trainable
from .grow import hold_back_rows
from .spec import MethodSpec
from .tasks import TaskData

GIVA_GRADIENT_VARIANTS = ("Vr", "VrUr", "VrU2r", "VrUrand")


@dataclass
class BuiltModel:
    model: nn.Module
    init_seconds: float = 0.0  # everything before the first step that a plain LoRA does not do
    gradient_seconds: float = 0.0
    svd_seconds: float = 0.0


def quantization_config(quantization: Optional[str]) -> Any:
    """The ``BitsAndBytesConfig`` of a task's ``quantization`` (``None``: load the weights as stored).

    ``'nf4'`` is QLoRA's base: 4-bit NormalFloat with double quantisation; the matmuls run in float32 (the
    benchmark's dtype, so a 4-bit row differs from its unquantised twin by the quantisation alone). LoRA on this
    base is QLoRA; GiVA on it is GiVA on the same frozen 4-bit weights.
    """
    if quantization is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantization {quantization!r} needs bitsandbytes: pip install -e '.[quant]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
    )


def load_base(task: TaskData, seed: int, quantize: bool = True) -> nn.Module:
    """The task's pretrained model (quantised as the task says, unless ``quantize`` is False)."""
    torch.manual_seed(seed)  # the fresh classification head: identical for every method of a seed
    quantized = quantization_config(task.spec.quantization) if quantize else None
    kwargs = {"quantization_config": quantized} if quantized is not None else {}
    if task.spec.kind == "clm":
        model = AutoModelForCausalLM.from_pretrained(task.model_path, **kwargs)
        model.config.pad_token_id = task.tokenizer.pad_token_id
    else:
        model = AutoModelForSequenceClassification.from_pretrained(task.model_path, num_labels=task.num_labels, **kwargs)
        ensure_pad_token(task.tokenizer, model)
    if quantized is not None:
        # Every method on the same bitsandbytes kernels: GiVA turns off the AVX512-BF16 CPUs' inference repacking
        # when it wraps the model (docs/quantization.md); QLoRA's rows would otherwise evaluate on it.
        keep_4bit_layers_trainable(model)
    return model


def _task_type(task: TaskData) -> str:
    return "CAUSAL_LM" if task.spec.kind == "clm" else "SEQ_CLS"


def peft_config(method: MethodSpec, task: TaskData, seed: int) -> Any:
    kwargs = {**method.peft_kwargs, "target_modules": method.targets(task.spec.target_modules)}
    common = {"task_type": _task_type(task)}
    if method.peft_type == "LORA":
        if "lora_ga_config" in kwargs:
            from peft.tuners.lora.config import LoraGAConfig

            kwargs["lora_ga_config"] = LoraGAConfig(**kwargs["lora_ga_config"])
        return LoraConfig(**kwargs, **common)
    if method.peft_type == "VERA":
        return VeraConfig(**{"projection_prng_key": seed, **kwargs}, **common)
    if method.peft_type == "GIVA":
        return GivaConfig(**{"seed": seed, **kwargs}, **common)
    raise ValueError(f"method {method.name!r}: unknown peft_type {method.peft_type!r}")


def build_model(
    method: MethodSpec, task: TaskData, seed: int, calibration: DataLoader, head_lr: Optional[float] = None,
) -> BuiltModel:
    """The model of ``method`` ready for its first training step (``calibration``: a loader used only for init;
    ``head_lr``: the task head's LR, for a GiVA method's ``init.head_warmup_epochs``)."""
    base = load_base(task, seed)
    if method.kind == "floor":
        return BuiltModel(_floor_model(base))
    if method.kind == "none":
        for param in base.parameters():
            param.requires_grad = False
        return BuiltModel(base)
    if method.kind == "probe":
        for name, param in base.named_parameters():
            param.requires_grad = name.split(".")[0] in ("classifier", "score")
        return BuiltModel(base)
    if method.kind == "full":
        for param in base.parameters():
            param.requires_grad = True
        return BuiltModel(base)
    if method.kind == "osora":
        return _build_osora(method, task, base, seed)
    config = peft_config(method, task, seed)
    start = time.perf_counter()
    if method.peft_type == "LORA" and getattr(config, "init_lora_weights", True) == "lora_ga":
        from peft.tuners.lora.loraga import preprocess_loraga

        batches = int(method.init.get("loraga_batches", 1))

        def train_step() -> None:
            for batch in islice(iter(calibration), batches):
                base(**batch).loss.backward()

        preprocess_loraga(base, config, train_step)
        gradient_seconds = time.perf_counter() - start
        model = get_peft_model(base, config)
        total = time.perf_counter() - start
        return BuiltModel(model, total, gradient_seconds, total - gradient_seconds)
    model = get_peft_model(base, config)
    built = BuiltModel(model, time.perf_counter() - start)
    if method.peft_type == "LORA" and str(getattr(config, "init_lora_weights", "")).startswith("pissa"):
        built.svd_seconds = built.init_seconds  # PiSSA's SVD of W happens inside get_peft_model
        return built
    built.init_seconds = 0.0  # plain wrapping is not initialisation work
    if method.peft_type == "GIVA" and config.variant in GIVA_GRADIENT_VARIANTS:
        if method.init.get("bases_from") == "unquantised" and task.spec.quantization is not None:
            start = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # loading the twin reseeds the global RNG: keep training's draws
                report = _bases_from_unquantised(model, method, task, seed, calibration)
            built.init_seconds = time.perf_counter() - start  # loading the unquantised twin included
        else:
            warmup, bases_first = method.init.get("head_warmup_epochs"), method.init.get("bases_before_warmup", False)
            warmup_seconds = 0.0
            if warmup and not bases_first:
                warmup_seconds = warm_up_head(model, calibration, warmup, head_lr)
            report = initialize(
                model, calibration, num_batches=calibration_batches(method, calibration), progress=False,
                statistic=method.init.get("statistic", "mean"),
            )
            if warmup and bases_first:
                warmup_seconds = warm_up_head(model, calibration, warmup, head_lr)
            built.init_seconds = report.total_seconds + warmup_seconds
            grow = method.grow()
            if grow is not None:
                hold_back_rows(model, grow[0])  # grown mid-training (runner.grow_hook)
        built.gradient_seconds, built.svd_seconds = report.gradient_seconds, report.svd_seconds
    return built


def strip_peft_prefix(name: str) -> str:
    """A parameter name without PEFT's ``base_model.model.`` prefix (as :func:`is_head_parameter` reads it)."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def warm_up_head(model: nn.Module, loader: DataLoader, epochs: int, lr: Optional[float]) -> float:
    """LP-FT's first stage: ``epochs`` passes of AdamW over the task head alone, the GiVA layers switched off (their
    bases may not exist yet; at init their output is zero anyway), at the head's ``lr``. Every ``requires_grad`` flag
    and the train/eval mode are restored. ``giva.initialize`` takes its gradient with PEFT's ``modules_to_save``
    wrappers switched off (the pretrained model), so the warmed head is also written into each wrapper's original
    module, the one the gradient then sees. Returns the seconds it took."""
    if lr is None:
        raise ValueError("init.head_warmup_epochs needs the task head's LR (a classification task with a head)")
    head = [p for name, p in model.named_parameters() if p.requires_grad and is_head_parameter(strip_peft_prefix(name))]
    if not head:
        raise ValueError("init.head_warmup_epochs: the model has no trainable task head (classifier / score) to warm up")
    start = time.perf_counter()
    flags = {param: param.requires_grad for param in model.parameters()}
    training = model.training
    layers = {m: m.disable_adapters for m in model.modules() if isinstance(m, GivaLayer)}  # each layer's own switch
    chosen = {id(p) for p in head}
    try:
        for layer in layers:
            layer.enable_adapters(False)
        for param in model.parameters():
            param.requires_grad = id(param) in chosen
        optimizer = torch.optim.AdamW(head, lr=lr)
        model.train()
        for _ in range(epochs):
            for batch in loader:
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        for layer, disabled in layers.items():
            layer.enable_adapters(not disabled)
        for param, flag in flags.items():
            param.requires_grad = flag
        model.train(training)
    with torch.no_grad():
        for wrapper in model.modules():
            copies = getattr(wrapper, "modules_to_save", None)
            if copies is not None and hasattr(wrapper, "original_module"):
                if len(copies) != 1:
                    raise ValueError(f"init.head_warmup_epochs: a head with {len(copies)} adapters' copies; warm up one")
                wrapper.original_module.load_state_dict(next(iter(copies.values())).state_dict())
    return time.perf_counter() - start


def _bases_from_unquantised(model: nn.Module, method: MethodSpec, task: TaskData, seed: int, calibration: DataLoader) -> Any:
    """GiVA's bases from the gradient of the same weights loaded without quantisation (same seed, same batches),
    loaded into the quantised ``model`` as a checkpoint's bases would be. Returns the twin's ``initialize`` report."""
    twin = get_peft_model(load_base(task, seed, quantize=False), peft_config(method, task, seed))
    report = initialize(twin, calibration, num_batches=calibration_batches(method, calibration), progress=False)
    bases = {key: value for key, value in twin.state_dict().items() if ".giva_A." in key or ".giva_B." in key}
    unexpected = model.load_state_dict(bases, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"the quantised model has no GiVA bases named {unexpected[:3]} (the unquantised twin has)")
    for adapter, config in twin.peft_config.items():
        model.peft_config[adapter].bases_info = {**config.bases_info, "source": "gradient of the unquantised weights"}
    return report


def calibration_batches(method: MethodSpec, calibration: DataLoader) -> int:
    """k of a GiVA method: its ``init.num_batches`` (default 1), or every batch of the training set for ``"all"``."""
    k = method.init.get("num_batches", 1)
    if k == "all":
        return len(calibration)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"method {method.name!r}: init.num_batches must be a positive integer or 'all', got {k!r}")
    return k


def _floor_model(base: nn.Module, targets: Optional[tuple[str, ...]] = None) -> nn.Module:
    """The speed floor: every weight frozen, but the input embeddings' output requires grad, so a backward
    pass still runs through every layer to the inputs. No adapter can train in less time than this.

    With ``targets`` (the names of the adapted modules, as in ``target_modules``) the backward starts at their
    outputs instead, where an adapter on each of them starts it: the first block's targeted projections then compute
    no input gradient, which no adapter row computes either (their input, the embeddings, needs none)."""
    for param in base.parameters():
        param.requires_grad = False
    if targets is None:
        base.get_input_embeddings().register_forward_hook(lambda module, args, output: output.requires_grad_(True))
        return base
    modules = [m for name, m in base.named_modules() if name.rsplit(".", 1)[-1] in targets]
    if not modules:
        raise ValueError(f"floor: no module named any of {list(targets)}")
    for module in modules:
        module.register_forward_hook(_require_grad)
    return base


def _require_grad(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    if not output.requires_grad:  # an output that needs no gradient does not depend on one that does: a leaf
        output.requires_grad_(True)


@torch.no_grad()
def _build_osora(method: MethodSpec, task: TaskData, base: nn.Module, seed: int) -> BuiltModel:
    """OSoRA (arXiv 2505.14350) on GiVA's `weight` bases: ``W = W_res + diag(o) U_r diag(s) V_r^T``.

    ``U_r, V_r`` (top-r singular vectors of W) are frozen, ``s`` starts at the top-r singular
    values and ``o`` at ones (both trained), and W is replaced by its residual, so the adapted
    model equals the pretrained one at step 0.
    """
    kwargs = {**method.peft_kwargs, "variant": "weight", "target_modules": method.targets(task.spec.target_modules)}
    start = time.perf_counter()
    model = get_peft_model(base, GivaConfig(**{"seed": seed, **kwargs}, task_type=_task_type(task)))
    for module in model.modules():
        if not isinstance(module, GivaLayer):
            continue
        for adapter in module.giva_A.keys():
            weight = module.base_weight_matrix()
            a, b = module.giva_A[adapter], module.giva_B[adapter]
            singular = torch.linalg.svdvals(weight.float())[: a.shape[0]]
            module.giva_lambda_s[adapter].copy_(singular)
            module.giva_lambda_o[adapter].fill_(1.0)
            principal = b @ (singular[:, None] * a)  # out x in, equals U_r S_r V_r^T
            residual = weight.float() - principal
            residual = residual.T if module.fan_in_fan_out else residual  # back to the stored layout
            module.get_base_layer().weight.copy_(residual.to(weight.dtype))
    return BuiltModel(model, time.perf_counter() - start, 0.0, time.perf_counter() - start)
