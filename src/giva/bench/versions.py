"""The software a benchmark record was measured with (every suite writes this into its results)."""

from __future__ import annotations

import platform

import torch


def versions() -> dict[str, str]:
    """Python, torch, transformers, PEFT and giva versions, the platform and torch's CPU thread count."""
    import peft
    import transformers

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "giva": __version__,
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
    }
