"""GiVA: Gradient-Informed Bases for Vector-Based Adaptation, as a PEFT method.

``import giva`` registers the method with PEFT; then::

    model = peft.get_peft_model(base_model, giva.GivaConfig(r=8, target_modules=["query", "value"]))
    giva.initialize(model, train_dataloader)   # bases from the loss gradient (k = 1 batch)
"""

from . import peft_compat  # noqa: F401, I001  (first: refuses a too-old PEFT before anything imports its internals)
from . import checkpoint, export
from .bases import GRADIENT_VARIANTS, VARIANTS
from .checkpoint import CheckpointError
from .config import GivaConfig
from .init import GradientInitError, InitReport, bases_initialized, initialize
from .integrations.trainer import GivaInitCallback
from .layer import BasesNotInitializedError, GivaLayer
from .model import GivaModel
from .peft_compat import (
    GIVA_PEFT_TYPE,
    install_checkpoint_hooks,
    install_lora_conversion,
    install_transformers_load_hook,
    register,
)

__version__ = "0.1.0"

register(GivaConfig, GivaModel)
install_checkpoint_hooks(
    checkpoint.save_pretrained, checkpoint.checked_load, checkpoint.forget_checksum, checkpoint.load_peft_weights
)
install_transformers_load_hook(checkpoint.transformers_load_adapter)
install_lora_conversion(export.convert_module, export.convert_to_lora, export.save_as_lora)

__all__ = [
    "GIVA_PEFT_TYPE",
    "GRADIENT_VARIANTS",
    "VARIANTS",
    "BasesNotInitializedError",
    "CheckpointError",
    "GivaConfig",
    "GivaInitCallback",
    "GivaLayer",
    "GivaModel",
    "GradientInitError",
    "InitReport",
    "bases_initialized",
    "initialize",
]
