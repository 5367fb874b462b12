"""Federated fine-tuning with GiVA on Flower (``pip install giva[federated]``).

The clients agree on the frozen bases once, from the sum of their gradient sketches (a setup round),
then exchange only the trainable vectors and the head, averaged by FedAvg. Layout:

* ``task.py``: config, shards (IID / label-skew), models of each method, local training, FedAvg
* ``statistics.py``: a client's gradient statistics and the bases their sum gives (no Flower)
* ``messages.py``: what each message carries and its serialized size
* ``client_app.py`` / ``server_app.py``: the Flower ClientApp and ServerApp
* ``run.py``: the in-process and simulation engines, the centralised baseline, the reports

Importing this package does not import Flower; ``run_federated`` and ``run_comparison`` do.
"""

from typing import Any

from .task import METHODS, SPLITS, FederatedConfig

__all__ = ["METHODS", "SPLITS", "FederatedConfig", "run_comparison", "run_federated"]


def __getattr__(name: str) -> Any:
    if name in ("run_federated", "run_comparison"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
