"""`GivaConfig`: the PEFT config of a GiVA adapter."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig

from .bases import SVD_METHODS, VARIANTS
from .peft_compat import GIVA_PEFT_TYPE
from .serving import BASES_DTYPES

BIAS_CHOICES = ("none", "all", "giva_only")
COMPUTE_DTYPES = ("input", "float32")  # the adapter maths: in the input's dtype, or in fp32 (PEFT's autocast_adapter_dtype)
DEFAULT_TARGET_MODULES = "all-linear"  # what target_modules=None means (see GivaModel._prepare_adapter_config)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class GivaConfig(PeftConfig):
    """Configuration of a GiVA adapter (Gradient-Informed bases for Vector-based Adaptation).

    Each targeted linear map ``W`` (``out x in``) gets frozen bases ``A`` (``r x in``) and ``B``
    (``out x r``) and two trainable vectors ``lambda_s`` (``r``) and ``lambda_o`` (``out``):
    ``y = W x + lambda_o * (B (lambda_s * (A x)))``. With the gradient variants, ``A`` comes from
    the SVD of ``dL/dW`` at the pretrained checkpoint: call :func:`giva.initialize` (or use
    :class:`giva.GivaInitCallback`) before training.
    """

    r: int = field(default=8, metadata={"help": "Rank of the frozen bases (per block for fused layers)."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Names (or a regex) of the modules to adapt, e.g. ['query', 'value'], or 'all-linear'. nn.Linear and "
                "transformers' Conv1D are supported. If None (the default): 'all-linear', every linear layer except "
                "the output / classification head, which beat query+value in the benchmarks (PEFT knows a "
                "classifier head from task_type='SEQ_CLS'; without it the classifier is adapted too)."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (or a regex) of modules not to adapt."}
    )
    variant: str = field(
        default="Vr",
        metadata={
            "help": (
                "How the bases are made. Gradient variants (A = top-r right singular vectors of dL/dW): 'Vr' (B seeded "
                "random orthonormal, the default), 'VrUr' (B = top-r left singular vectors), 'VrU2r' (B = left singular "
                "vectors r..2r, as LoRA-GA), 'VrUrand' (B seeded unnormalised Gaussian). Data-free ablations: 'random' "
                "(A and B seeded orthonormal: VeRA with per-layer bases) and 'weight' (SVD of W itself, as OSoRA)."
            )
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the random bases; each layer draws from its own stream (seed, layer name)."}
    )
    svd: str = field(
        default="auto",
        metadata={
            "help": "SVD of the gradient: 'exact', 'randomized' (torch.svd_lowrank) or 'auto' (randomized when the layer's smaller side is >= 512)."
        },
    )
    bases_dtype: str = field(
        default="float32",
        metadata={
            "help": (
                "Storage dtype of the input basis A: 'float32' or 'bfloat16' (halves what each extra adapter holds; A "
                "is rounded once when computed and training, saving and reloading use exactly those values, so reload "
                "stays bit-exact; its rows are then orthonormal to ~1e-3 instead of ~1e-7). B stays float32."
            )
        },
    )
    compute_dtype: str = field(
        default="input",
        metadata={
            "help": (
                "dtype of the adapter maths in the forward. 'input' (the default): the input's dtype (bf16/fp16 on a "
                "half-precision model, fp32 on CPU), lambda_o folded into B, nothing of size tokens x out formed but the "
                "add into the base output; as fast as LoRA with autocast_adapter_dtype=False. 'float32': x cast to fp32, "
                "the adapter maths in fp32, the result cast back to the output's dtype, as PEFT LoRA's default "
                "(autocast_adapter_dtype=True), under torch.autocast too (where 'input' follows autocast). Both give the "
                "same result on an fp32 model without autocast. The vectors keep their own dtype "
                "either way (fp32 under PEFT's default autocast_adapter_dtype=True) and are cast at use."
            )
        },
    )
    lambda_s_init: float = field(default=1.0, metadata={"help": "Initial value of every entry of lambda_s."})
    lambda_o_init: float = field(
        default=0.0,
        metadata={
            "help": (
                "Initial value of every entry of lambda_o. Non-zero only with lambda_s_init = 0 (and no core), so that "
                "delta_W = 0 at init and the adapted model equals the base model (giva.initialize relies on it)."
            )
        },
    )
    core: bool = field(
        default=False,
        metadata={
            "help": (
                "Opt-in variant (not the paper's): a trainable r x r core C between the bases, "
                "delta_W = diag(lambda_o) B C diag(lambda_s) A, C initialised to the identity (r^2 more trainable "
                "parameters per layer; in the spirit of LoRA-XS / LoRA-SB)."
            )
        },
    )
    giva_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input (not the base path)."})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True if the target stores its weight as (in, out), as GPT-2's Conv1D. Set automatically."},
    )
    block_sizes: dict[str, Union[int, list[int]]] = field(
        default_factory=dict,
        metadata={
            "help": (
                "Fused projections: map a module name (suffix) to its output block sizes, e.g. {'qkv_proj': [3072, 1024, "
                "1024]}, or to a number of equal blocks, e.g. {'c_attn': 3}. Each block gets its own bases. GPT-2 c_attn, "
                "qkv_proj and gate_up_proj are recognised without this; map a name to 1 to treat it as one matrix."
            )
        },
    )
    adapt_blocks: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": "Fused projections: map a module name (suffix) to the indices of the blocks to adapt, e.g. "
            "{'c_attn': [0, 2]} for Q and V only. Default: all blocks."
        },
    )
    bias: str = field(default="none", metadata={"help": "Biases to train: 'none', 'all' or 'giva_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Modules besides the GiVA layers to train and save, e.g. the freshly initialised classifier head."
        },
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None,
        metadata={
            "help": (
                "As PEFT LoRA's (applied by PEFT to any method): token indices whose embedding rows are trained and "
                "saved, not the whole matrix (peft.TrainableTokensModel). A list targets the model's input embedding "
                "layer (or, if not found, `embed_tokens`); a dict maps embedding module names to their indices, e.g. "
                "{'embed_tokens': [0, 1, ...]}. TRL's SFTTrainer sets it when chat_template_path adds tokens. FSDP needs "
                "use_orig_params=True (non-uniform requires_grad)."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: lambda_o = 0, so the adapted model equals the base model at init. False (testing only): random "
                "bases and non-zero vectors, so the adapter is not an identity."
            )
        },
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt (requires a recognisable layer list)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList holding the layers, used with layers_to_transform."}
    )
    bases_info: Optional[dict[str, Any]] = field(
        default=None,
        metadata={
            "help": "Written by giva.initialize: how the bases were made (variant, batches, seed, svd, dtype). Do not set."
        },
    )
    weights_sha256: Optional[str] = field(
        default=None,
        metadata={
            "help": "Written into adapter_config.json by save_pretrained: sha256 of the weights file saved with it, "
            "checked at load (giva.checkpoint). Not kept in memory. Do not set."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and getattr(self, "layers_to_transform", None) is not None:
            # PEFT's rule (its own check from 0.22, before this one could run): a string target (a regex, matched as a
            # whole, or 'all-linear') would make the layer filter be ignored.
            raise ValueError(
                "GivaConfig.layers_to_transform cannot be used when target_modules is a string "
                f"({self.target_modules!r}: a regex or 'all-linear'); list the module names, or leave target_modules "
                "None (every linear layer)"
            )
        super().__post_init__()
        self.peft_type = GIVA_PEFT_TYPE
        _check_modules("target_modules", self.target_modules)
        _check_modules("exclude_modules", self.exclude_modules)
        # a tuple as a list: PEFT filters only a set or list by layers_to_transform (a tuple adapted every layer)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        saved = self.modules_to_save
        if saved is not None and (
            isinstance(saved, str) or not isinstance(saved, (list, tuple)) or not all(isinstance(n, str) and n for n in saved)
        ):
            hint = f": modules_to_save=[{saved!r}]" if isinstance(saved, str) else ""
            raise ValueError(f"GivaConfig.modules_to_save must be a list of module names, got {saved!r}{hint}")
        if not _is_int(self.r) or self.r < 1:
            raise ValueError(f"GivaConfig.r must be a positive integer, got {self.r!r}")
        if not _is_int(self.seed) or not -(2**63) <= self.seed < 2**63:  # the SVD's generator takes a signed 64-bit seed
            raise ValueError(f"GivaConfig.seed must be a signed 64-bit integer, got {self.seed!r}")
        if not _is_real(self.lambda_s_init) or not math.isfinite(self.lambda_s_init):
            raise ValueError(f"GivaConfig.lambda_s_init must be a finite number, got {self.lambda_s_init!r}")
        if not _is_real(self.lambda_o_init) or not math.isfinite(self.lambda_o_init):
            raise ValueError(f"GivaConfig.lambda_o_init must be a finite number, got {self.lambda_o_init!r}")
        if self.lambda_o_init != 0 and self.lambda_s_init != 0:
            raise ValueError(
                f"GivaConfig.lambda_o_init={self.lambda_o_init!r} needs lambda_s_init=0 (got {self.lambda_s_init!r}): "
                "one of the two vectors must start at 0 so that the adapter is an identity at init"
            )
        if self.lambda_o_init == 0 and self.lambda_s_init == 0:
            raise ValueError(
                "GivaConfig.lambda_s_init and lambda_o_init are both 0: every gradient of the vectors is then 0 and the "
                "adapter never trains; exactly one of the two must start at 0 (the default: lambda_s_init=1, lambda_o_init=0)"
            )
        if not isinstance(self.core, bool):
            raise ValueError(f"GivaConfig.core must be True or False, got {self.core!r}")
        if self.core and self.lambda_o_init != 0:
            raise ValueError("GivaConfig.core=True needs lambda_o_init=0 (the core starts at the identity)")
        if not _is_real(self.giva_dropout):
            raise ValueError(f"GivaConfig.giva_dropout must be a number in [0, 1), got {self.giva_dropout!r}")
        for flag in ("fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"GivaConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"GivaConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"GivaConfig.svd must be one of {SVD_METHODS}, got {self.svd!r}")
        if self.bases_dtype not in BASES_DTYPES:
            raise ValueError(f"GivaConfig.bases_dtype must be one of {tuple(BASES_DTYPES)}, got {self.bases_dtype!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"GivaConfig.compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if not 0.0 <= self.giva_dropout < 1.0:
            raise ValueError(f"GivaConfig.giva_dropout must be in [0, 1), got {self.giva_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"GivaConfig.bias must be one of {BIAS_CHOICES}, got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("GivaConfig.layers_pattern is only used with layers_to_transform, which is None")
        layers = self.layers_to_transform
        if layers is not None:
            if not ((_is_int(layers) and layers >= 0) or (isinstance(layers, list) and layers and all(_is_int(i) and i >= 0 for i in layers))):
                raise ValueError(
                    f"GivaConfig.layers_to_transform must be a layer index or a non-empty list of layer indices (ints >= 0), "
                    f"got {layers!r} (None adapts every layer)"
                )
        pattern = self.layers_pattern
        if pattern is not None and not (
            isinstance(pattern, str) or (isinstance(pattern, list) and all(isinstance(p, str) for p in pattern))
        ):
            raise ValueError(f"GivaConfig.layers_pattern must be a string or a list of strings, got {pattern!r}")
        for option in ("block_sizes", "adapt_blocks"):
            if not isinstance(getattr(self, option), dict):
                raise ValueError(f"GivaConfig.{option} must be a dict of module name -> value, got {getattr(self, option)!r}")
        if self.bases_info is not None and not isinstance(self.bases_info, dict):
            raise ValueError(f"GivaConfig.bases_info is written by giva.initialize (a dict); got {self.bases_info!r}")
        for name, sizes in self.block_sizes.items():
            valid = (_is_int(sizes) and sizes >= 1) or (
                isinstance(sizes, list) and sizes and all(_is_int(s) and s >= 1 for s in sizes)
            )
            if not valid:
                raise ValueError(
                    f"GivaConfig.block_sizes[{name!r}] must be a positive int or a non-empty list of positive ints, "
                    f"got {sizes!r}"
                )
        for name, blocks in self.adapt_blocks.items():
            if not (isinstance(blocks, list) and blocks and all(_is_int(b) and b >= 0 for b in blocks)):
                raise ValueError(
                    f"GivaConfig.adapt_blocks[{name!r}] must be a non-empty list of block indices, got {blocks!r}"
                )


def _check_modules(option: str, value: Any) -> None:
    """``target_modules`` / ``exclude_modules``: None, a valid regex string, or a list (set) of module-name strings."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"GivaConfig.{option} {value!r} is not a valid regular expression: {error}") from None
        return
    if isinstance(value, (list, set, tuple)):
        bad = [v for v in value if not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"GivaConfig.{option} must list module names (non-empty strings), got {sorted(map(repr, bad))}")
        return
    raise ValueError(f"GivaConfig.{option} must be a module-name regex string or a list of names, got {value!r}")
