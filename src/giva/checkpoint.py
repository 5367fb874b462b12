"""Checkpoint I/O of GiVA adapters: atomic folder saves, a weights checksum, and checks before loading.

A save writes the complete adapter into a temporary sibling folder, flushes it to disk, then swaps it
with the target folder in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so a process killed at any
point leaves the target folder either as it was or as the new save, never a mix. Where the atomic
exchange is unavailable (other systems, some file systems) the old folder is renamed aside first and
put back by the next save or load if the process died between the two renames.

``adapter_config.json`` records the sha256 of the weights file written with it (``weights_sha256``);
loading a GiVA folder whose weights do not match, or lack, raises :class:`CheckpointError` naming the
folder and the file, instead of loading a mix or asking the Hugging Face hub for a "repo id".
"""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import inspect
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")  # in PEFT's order of preference
CHECKSUM_KEY = "weights_sha256"
GIVA_TYPE = "GIVA"
_TMP_TAG = ".giva-tmp-"  # .<name>.giva-tmp-<pid>-<token>: a save in progress (or the old copy being removed)
_OLD_TAG = ".giva-old-"  # .<name>.giva-old-<pid>-<token>: the old folder moved aside by the fallback swap
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_checking: ContextVar[bool] = ContextVar("giva_checkpoint_checking", default=False)


class CheckpointError(ValueError):
    """An adapter folder that cannot be loaded as it is; the message names the folder and the file."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def looks_local(name: str | os.PathLike) -> bool:
    """True for a string that can only be a file-system path, never a hub id ("org/name" or "name")."""
    text = os.fspath(name)
    return (
        os.path.exists(text)
        or text.startswith((".", "~", "/"))
        or text.count("/") > 1
        or (os.sep != "/" and os.sep in text)
        or (os.altsep is not None and os.altsep != "/" and os.altsep in text)
    )


# ---------------------------------------------------------------------------------------- atomic swap


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False where the system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the data files were synced
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _keep_unwritten(old: Path, new: Path) -> None:
    """Hard-link (else copy) into ``new`` every file of ``old`` the save did not write, as an in-place save keeps them."""
    for folder, _, files in os.walk(old):
        relative = Path(folder).relative_to(old)
        (new / relative).mkdir(exist_ok=True)
        for name in files:
            source, dest = Path(folder) / name, new / relative / name
            if dest.exists() or dest.is_symlink():
                continue
            if source.is_symlink():
                os.symlink(os.readlink(source), dest)
                continue
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)


def _owner_alive(stale: Path) -> bool:
    """Whether the process named in a temp folder's name (``...-<pid>-<token>``) still runs on this machine."""
    try:
        pid = int(stale.name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: str | os.PathLike) -> None:
    """Finish what an interrupted save left beside ``target``: put a moved-aside old folder back, delete temp folders.

    Folders of a save still running (its process is alive) are left alone.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = f".{glob.escape(target.name)}.giva-*"
    for stale in sorted(target.parent.glob(pattern)):
        if _owner_alive(stale):
            continue
        if _OLD_TAG in stale.name and not target.exists():
            try:
                os.rename(stale, target)
            except OSError as err:  # e.g. a read-only location: load from the moved-aside copy's name instead
                raise CheckpointError(
                    f"{target} was moved aside to {stale} by an interrupted save and cannot be put back ({err.strerror})"
                ) from None
            logger.warning("restored %s from %s, left by a save that was interrupted", target, stale.name)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def _swap_in(tmp: Path, target: Path) -> None:
    """Make the complete folder ``tmp`` the new ``target``; on return ``tmp`` holds the old folder (or nothing)."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        return
    backup = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, backup)
    os.rename(tmp, target)  # killed before this line: the next save or load renames `backup` back
    os.rename(backup, tmp)  # `tmp` now names the old copy, removed by the caller


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends normally it replaces ``target`` at once.

    Files already in ``target`` that the block did not write are kept (as an in-place save would). If the
    block raises, ``target`` is untouched. A symlinked target keeps its link: the folder it points to is swapped.
    """
    target = Path(os.path.realpath(os.path.expanduser(os.fspath(target))))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save into {target}: it is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = target.parent / f".{target.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    try:
        yield tmp
        if target.is_dir():
            tmp.chmod(target.stat().st_mode & 0o7777)
            _keep_unwritten(target, tmp)
        _fsync_tree(tmp)
        cwd = Path.cwd().resolve() if os.path.isdir(".") else None
        _swap_in(tmp, target)
        _fsync_path(target.parent)
        if cwd is not None and (cwd == target or target in cwd.parents):
            os.chdir(target / cwd.relative_to(target) if (target / cwd.relative_to(target)).is_dir() else target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ checksums


def _giva_folders(root: Path) -> Iterator[Path]:
    """Folders under ``root`` (itself included) whose adapter_config.json is a GiVA config."""
    for config_file in sorted(root.rglob(CONFIG_NAME)):
        if _read_config(config_file).get("peft_type") == GIVA_TYPE:
            yield config_file.parent


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file} is not a valid adapter config (JSON): {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a valid adapter config: expected a JSON object")
    return config


def _weights_file(folder: Path) -> Optional[Path]:
    return next((folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()), None)


def record_checksums(root: str | os.PathLike) -> None:
    """Write the sha256 of each GiVA adapter's weights file into its adapter_config.json (under ``root``)."""
    for folder in _giva_folders(Path(root)):
        weights = _weights_file(folder)
        if weights is None:
            continue
        config_file = folder / CONFIG_NAME
        config = _read_config(config_file)
        config[CHECKSUM_KEY] = sha256_file(weights)
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True))  # PEFT's own layout


def check_adapter_folder(model_id: str | os.PathLike, subfolder: Optional[str] = None) -> None:
    """Raise a clear error before PEFT loads a local GiVA folder that is incomplete or mixes two saves.

    Hub ids and folders of other PEFT methods pass through unchanged (PEFT reports on those).
    """
    if not looks_local(model_id):
        return
    folder = Path(os.path.expanduser(os.fspath(model_id)))
    folder = folder / subfolder if subfolder else folder
    recover(folder)
    if not folder.exists():
        raise CheckpointError(f"no such adapter folder: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; an adapter is a folder holding {CONFIG_NAME} and {WEIGHTS_NAMES[0]}")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{folder} holds no {CONFIG_NAME}: not a saved adapter folder")
    config = _read_config(config_file)
    if config.get("peft_type") != GIVA_TYPE:
        return
    weights = _weights_file(folder)
    if weights is None:
        raise CheckpointError(
            f"GiVA adapter folder {folder} has {CONFIG_NAME} but no {WEIGHTS_NAMES[0]}: the weights file is missing"
        )
    expected = config.get(CHECKSUM_KEY)
    if expected is not None and sha256_file(weights) != expected:
        raise CheckpointError(
            f"{weights} does not match {config_file} (sha256 differs from the recorded {CHECKSUM_KEY}): the folder "
            "mixes files of two different saves; save the adapter again"
        )


# ------------------------------------------------------------------------------ PeftModel entry points


def save_pretrained(original: Callable[..., None], model: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """PEFT's ``save_pretrained`` made atomic, with the weights checksum written into each GiVA config."""
    bound = inspect.signature(original).bind(model, save_directory, *args, **kwargs)
    bound.apply_defaults()
    if not bound.arguments.get("is_main_process", True) or os.path.isfile(os.fspath(save_directory)):
        original(model, save_directory, *args, **kwargs)  # nothing written, or PEFT's own "is a file" error
        return
    with atomic_directory(save_directory) as tmp:
        card = Path(os.path.realpath(os.fspath(save_directory))) / "README.md"
        if card.is_file():  # PEFT updates an existing model card in place: start from a copy of it
            shutil.copy2(card, tmp / "README.md")
        original(model, str(tmp), *args, **kwargs)
        record_checksums(tmp)


@contextmanager
def checked_load(model_id: str | os.PathLike, subfolder: Optional[str] = None) -> Iterator[None]:
    """Check the folder before PEFT reads it, once per load (``from_pretrained`` calls ``load_adapter`` inside)."""
    if _checking.get():
        yield
        return
    check_adapter_folder(model_id, subfolder)
    token = _checking.set(True)
    try:
        yield
    finally:
        _checking.reset(token)


def forget_checksum(model: Any, adapter_name: str) -> None:
    """The checksum describes the files, not the model in memory; a later save writes a fresh one."""
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is not None and getattr(config, CHECKSUM_KEY, None) is not None:
        setattr(config, CHECKSUM_KEY, None)


# ------------------------------------------------------------- transformers' load_adapter entry point


def transformers_load_adapter(original: Callable[..., Any], model: Any, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``PreTrainedModel.load_adapter`` (``PeftAdapterMixin``) with the checks of ``PeftModel`` loading.

    transformers reads an adapter folder with its own loader, which only logs a report of missing and
    unexpected keys: a GiVA folder that mixes two saves, lacks a basis, or was saved from a model of
    another depth would load with changed outputs. For a local folder this runs
    :func:`check_adapter_folder` first (weights checksum), then, once transformers has injected a GiVA
    adapter, loads the folder's weights again through PEFT's ``set_peft_model_state_dict``, whose GiVA
    hook raises on missing tensors, tensors for layers the model lacks and differently regenerated
    seeded bases. On such an error the new adapter is deleted again (as ``model.delete_adapter`` does)
before the error propagates, so the model computes what it computed before the call.
    Hub ids and state dicts passed in memory load unchecked, as with ``PeftModel.from_pretrained``.
    ``AutoModel*.from_pretrained(adapter_folder)`` goes through here too.
    """
    arguments = inspect.signature(original).bind(model, *args, **kwargs).arguments
    load_config = arguments.get("load_config")
    model_id = arguments.get("peft_model_id") or getattr(load_config, "pretrained_model_name_or_path", None)
    if model_id is None or arguments.get("adapter_state_dict") is not None or not looks_local(model_id):
        return original(model, *args, **kwargs)
    download = (arguments.get("kwargs") or {}).get("download_kwargs") or getattr(load_config, "download_kwargs", None) or {}
    subfolder = download.get("subfolder") or None
    adapter_name = arguments.get("adapter_name") or "default"
    existed = adapter_name in (getattr(model, "peft_config", None) or {})
    with checked_load(model_id, subfolder):
        result = original(model, *args, **kwargs)
    config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
    if config is None or config.peft_type != GIVA_TYPE:
        return result
    folder = Path(os.path.expanduser(os.fspath(model_id)))
    folder = folder / subfolder if subfolder else folder
    try:
        _reload_through_peft(model, folder, adapter_name)
    except Exception:
        if not existed:
            _delete_adapter(model, adapter_name)
        raise
    forget_checksum(model, adapter_name)
    return result


def _reload_through_peft(model: Any, folder: Path, adapter_name: str) -> None:
    """Load ``folder``'s weights into ``model``'s adapter with PEFT's loader (the same values transformers wrote),
    so that GiVA's load checks run; they raise ``ValueError`` naming the layers."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(str(folder), device="cpu"), adapter_name=adapter_name)


def _delete_adapter(model: Any, adapter_name: str) -> None:
    """What transformers' ``model.delete_adapter`` does (it asks for PEFT >= 0.22, GiVA works from 0.21):
    the adapter's tensors leave every layer and its config leaves the model; the emptied wrappers pass through."""
    from peft.functional import delete_adapter

    delete_adapter(model, adapter_name=adapter_name, prefix=f"{GIVA_TYPE.lower()}_")  # as transformers names it
    model.peft_config.pop(adapter_name, None)
    if not model.peft_config:
        del model.peft_config
        model._hf_peft_config_loaded = False
