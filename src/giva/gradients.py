"""Kept for existing imports: the initialisation now lives in the ``giva.init`` package."""

from .init import (
    DEFAULT_NUM_BATCHES,
    GradientInitError,
    InitReport,
    bases_initialized,
    compute_gradients,
    giva_configs,
    giva_layers,
    initialize,
)
from .init.capture import LossFn

__all__ = [
    "DEFAULT_NUM_BATCHES",
    "GradientInitError",
    "InitReport",
    "LossFn",
    "bases_initialized",
    "compute_gradients",
    "giva_configs",
    "giva_layers",
    "initialize",
]
