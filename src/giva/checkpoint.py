"""Checkpoint I/O of GiVA adapters: atomic folder saves, a weights checksum, and checks before loading.

A save writes the complete adapter into a temporary sibling folder, flushes it to disk, then swaps it
with the target folder in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so a process killed at any
point leaves the target folder either as it was or as the new save, never a mix. Where the atomic
exchange is unavailable (other systems, some file systems) the old folder is renamed aside first and
put back by the next save or load if the process died between the two renames. Where the folder cannot
be swapped at all (a mount point such as a container's ``/output`` volume, a parent folder that refuses
new entries) the save is staged inside the folder and its files replace the old ones one by one, the
config last: no longer atomic, but a cut-off save of a GiVA adapter fails its weights checksum at load.

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
import math
import os
import secrets
import shutil
import socket
import warnings
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
_TMP_TAG = ".giva-tmp-"  # .<name>.giva-tmp-<host>-<pid>-<token>: a save in progress (or the old copy being removed);
# .giva-tmp-<host>-<pid>-<token> inside the target: a save in progress that replaces the files one by one
_OLD_TAG = ".giva-old-"  # .<name>.giva-old-<host>-<pid>-<token>: the old folder moved aside by the fallback swap
# Errors of a swap that the folder's place refuses (a mount point: EBUSY; another file system: EXDEV; a parent
# without write permission, or a sticky one of another owner: EACCES / EPERM): such a save replaces files in place.
_IN_PLACE_ERRORS = (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES)
_EXPORT_TAG = ".giva-export-"  # staging folders of giva < 0.2 LoRA exports, inside the output folder
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_checking: ContextVar[bool] = ContextVar("giva_checkpoint_checking", default=False)
_verified: ContextVar[Optional[Path]] = ContextVar("giva_checkpoint_verified", default=None)


class CheckpointError(ValueError):
    """An adapter folder that cannot be loaded as it is; the message names the folder and the file."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def nested_or_same(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """``a`` and ``b`` are one folder, or one lies inside the other (``~`` expanded, relative to the working folder)."""
    a, b = (Path(os.path.abspath(os.path.expanduser(os.fspath(x)))) for x in (a, b))
    return a == b or a in b.parents or b in a.parents


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
            # A link is an entry of its folder (synced below); its target, dangling or not, is no part of the save.
            if not (Path(folder) / name).is_symlink():
                _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _kept(folder: Path, name: str, top: bool, wrote_weights: bool, replaced: Optional[Callable[[str], bool]]) -> bool:
    """Whether the entry ``name`` of ``folder`` (in the old folder; ``top``: its top level), which the save did not
    write, stays in the saved folder, as an in-place save keeps it.

    Every file, link (to a folder too) and folder stays, except: staging folders an interrupted LoRA export of an
    older giva left, or an in-place save (:func:`_replace_in_place`; :func:`recover` removes those); an adapter
    weights file beside the one the save wrote in that folder (``wrote_weights``: ``adapter_model.bin`` after a
    safetensors save, or the reverse), which the new config's checksum does not cover and PEFT would read first; and
    the top-level files (not folders) whose name ``replaced`` accepts (files the writer owns that the save did not
    write this time)."""
    path = folder / name
    if name.startswith((_EXPORT_TAG, _TMP_TAG)) and path.is_dir() and not path.is_symlink():
        return False
    if wrote_weights and name in WEIGHTS_NAMES:
        return False
    return not (top and replaced is not None and not path.is_dir() and replaced(name))


def _wrote_weights(new: Path) -> bool:
    return any((new / name).exists() for name in WEIGHTS_NAMES)


def _keep_unwritten(old: Path, new: Path, replaced: Optional[Callable[[str], bool]]) -> None:
    """Hard-link (else copy) into ``new`` every entry of ``old`` the save did not write and :func:`_kept` keeps, so
    that ``new`` can be swapped in whole.

    Symbolic links stay links to the same target, links to folders included (``os.walk`` lists those among the
    folders without entering them); a folder the save did not write keeps its mode.
    """
    for folder, dirs, files in os.walk(old):
        relative = Path(folder).relative_to(old)
        if not (new / relative).exists():
            (new / relative).mkdir()
            (new / relative).chmod(Path(folder).stat().st_mode & 0o7777)
        top, wrote_weights = folder == os.fspath(old), _wrote_weights(new / relative)
        linked = [name for name in dirs if (Path(folder) / name).is_symlink()]
        dirs[:] = [name for name in dirs if name not in linked and _kept(Path(folder), name, top, wrote_weights, replaced)]
        for name in [*files, *linked]:
            source, dest = Path(folder) / name, new / relative / name
            if os.path.lexists(dest) or not _kept(Path(folder), name, top, wrote_weights, replaced):
                continue
            if source.is_symlink():
                os.symlink(os.readlink(source), dest)
                continue
            try:
                os.link(source, dest)
            except OSError:
                shutil.copy2(source, dest)


def _host_tag() -> str:
    """This machine in temp-folder names: a short digest of the host name (no dashes, so names parse back)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]


def _owner_tag() -> str:
    return f"{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def _owner_alive(stale: Path) -> bool:
    """Whether the save that named a temp folder (``...-<host>-<pid>-<token>``) may still run.

    A PID means something only on the machine that wrote it: on a shared file system a folder of another
    host is treated as in use (its process cannot be seen from here), so a load here never deletes or
    restores another machine's save in progress. Names without a host (older giva) are judged by PID alone.
    """
    parts = stale.name.rsplit("-", 3)
    host, pid_text = (parts[-3], parts[-2]) if len(parts) == 4 and parts[-3].isalnum() and len(parts[-3]) == 12 else (None, None)
    if host is None:
        host, pid_text = _host_tag(), stale.name.rsplit("-", 2)[-2] if stale.name.count("-") >= 2 else ""
    if host != _host_tag():
        return True
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: str | os.PathLike) -> None:
    """Finish what an interrupted save left beside ``target``: put a moved-aside old folder back, delete temp folders
    (also the staging folder an in-place save left inside ``target``).

    Folders of a save still running (its process is alive) are left alone.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    for stale in target.glob(f"{_TMP_TAG}*") if target.is_dir() else ():  # staging of an in-place save
        if not _owner_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
    pattern = f".{glob.escape(target.name)}.giva-*"
    for stale in sorted(target.parent.glob(pattern)):
        if _owner_alive(stale):
            if _OLD_TAG in stale.name and not target.exists():
                raise CheckpointError(
                    f"{target} is moved aside to {stale} by a save that is still running (or ran on another machine "
                    "sharing this folder); retry when it ends, or rename the folder back if no save runs"
                )
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
    """Make the complete folder ``tmp`` the new ``target``; on return ``tmp`` holds the old folder (or nothing).
    A plain rename first: it makes a new folder, and fails on an existing one (made by another process saving the
    same folder, a second rank calling ``save_pretrained``, as well), which is then replaced, the last save winning,
    as PEFT's. Without the exchange (a file system without ``renameat2``: NFS) two saves over one existing folder at
    once can still fail (docs/checkpoints.md)."""
    try:
        os.rename(tmp, target)
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(tmp, target):
        return
    backup = target.parent / f".{target.name}{_OLD_TAG}{_owner_tag()}"
    os.rename(target, backup)
    try:
        os.rename(tmp, target)  # killed before this line: the next save or load renames `backup` back
    except OSError:
        os.rename(backup, target)
        raise
    os.rename(backup, tmp)  # `tmp` now names the old copy, removed by the caller


_TOKENIZER_FILES = (
    "vocab.txt", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "tokenizer.json", "tokenizer_config.json",
    "tokenizer.model",
)


def is_side_file(name: str) -> bool:
    """A tokenizer file or labels.json: what an adapter folder holds besides its weights, config and README.

    A save that writes these (`giva finetune`, a LoRA export) passes this as ``atomic_directory``'s ``replaced``,
    so an earlier save's side files it did not write again (another model's chat template, say) are dropped."""
    return name in (*_TOKENIZER_FILES, "labels.json")  # by name: a user's tokenizer_notes.md is no side file


def _files(root: Path) -> list[Path]:
    """The files and links under ``root``, relative to it; each folder's ``adapter_config.json`` last (see
    :func:`_replace_in_place`)."""
    found = []
    for folder, dirs, files in os.walk(root):  # a link to a folder is listed among the folders, and not entered
        links = [name for name in dirs if Path(folder, name).is_symlink()]
        found += [Path(folder, name).relative_to(root) for name in [*files, *links]]
    return sorted(found, key=lambda path: (path.name == CONFIG_NAME, str(path)))


def _staging_folder(target: Path) -> tuple[Path, bool]:
    """A new empty folder for a save into ``target``, and whether the save goes in place: beside ``target``, to be
    swapped in whole (``False``), or inside an existing ``target`` where nothing can be swapped with it (``True``: a
    mount point, or a parent folder that refuses new entries: a volume mounted at ``/output``, a user's folder under
    a root-owned one), for :func:`_replace_in_place`."""
    beside = target.parent / f".{target.name}{_TMP_TAG}{_owner_tag()}"
    why = f"{target} is a mount point" if target.is_dir() and os.path.ismount(target) else None
    if why is None:
        try:
            os.mkdir(beside)
            return beside, False
        except PermissionError as err:
            if not target.is_dir():
                raise
            why = f"its folder {target.parent} refuses new entries ({err.strerror})"
    inside = target / f"{_TMP_TAG}{_owner_tag()}"
    os.mkdir(inside)
    _warn_in_place(target, why)
    return inside, True


def _warn_in_place(target: Path, why: str) -> None:
    logger.warning(
        "%s cannot be swapped whole (%s): saving into it file by file, %s last; the save is not atomic (a GiVA "
        "adapter cut off half-way fails its weights checksum at load)", target, why, CONFIG_NAME,
    )


def _replace_in_place(staged: Path, written: list[Path], target: Path, replaced: Optional[Callable[[str], bool]]) -> None:
    """Save into ``target`` file by file (``os.replace``) where the folder cannot be swapped whole.

    ``staged`` is a folder inside ``target`` holding the files ``written`` (relative paths, each ``adapter_config.json``
    last, as :func:`_files` orders them). The old files stay until every new config is in place; then the entries of
    ``target`` that the save neither wrote nor keeps (:func:`_kept`: a weights file of the other format, an earlier
    export's side files) are removed. Kept files are left where they are, untouched. A save cut off half-way leaves
    new weights beside the old config, which a GiVA adapter's ``weights_sha256`` refuses at load.
    """
    dropped = _dropped(target, staged, replaced)
    _fsync_tree(staged)
    for relative in written:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / relative, target / relative)
    for entry in dropped:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for folder, dirs, _ in os.walk(target):
        dirs[:] = [name for name in dirs if not name.startswith(_TMP_TAG)]
        _fsync_path(Path(folder))


def _dropped(target: Path, staged: Path, replaced: Optional[Callable[[str], bool]]) -> list[Path]:
    """The entries of ``target`` that the save (its files in ``staged``) neither wrote nor keeps (:func:`_kept`), a
    folder once, not its contents; staging folders of in-place saves are :func:`recover`'s business."""
    dropped = []
    for folder, dirs, files in os.walk(target):
        relative = Path(folder).relative_to(target)
        dirs[:] = [name for name in dirs if not name.startswith(_TMP_TAG)]
        top, wrote_weights = folder == os.fspath(target), _wrote_weights(staged / relative)
        gone = [name for name in [*files, *dirs] if not os.path.lexists(staged / relative / name)
                and not _kept(Path(folder), name, top, wrote_weights, replaced)]
        dropped += [Path(folder) / name for name in gone]
        dirs[:] = [name for name in dirs if name not in gone]
    return dropped


@contextmanager
def atomic_directory(target: str | os.PathLike, replaced: Optional[Callable[[str], bool]] = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block ends normally it replaces ``target`` at once.

    Files already in ``target`` that the block did not write are kept (as an in-place save would), except top-level
    files whose name ``replaced`` accepts (an earlier export's side files, say). If the
    block raises, ``target`` is untouched. A symlinked target keeps its link: the folder it points to is swapped.
    Where ``target`` cannot be swapped (a mount point; a parent that refuses new entries, or a swap that fails with
    EBUSY, EXDEV, EPERM or EACCES) the new files replace the old ones one by one instead, with a logged warning
    (:func:`_replace_in_place`): stock PEFT saves there, so giva does too.
    """
    target = Path(os.path.realpath(os.path.expanduser(os.fspath(target))))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save into {target}: it is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp, in_place = _staging_folder(target)
    try:
        yield tmp
        written = _files(tmp)
        _refuse_folders_in_the_way(target, written)
        if in_place:
            _replace_in_place(tmp, written, target, replaced)
        else:
            if target.is_dir():
                tmp.chmod(target.stat().st_mode & 0o7777)
                _keep_unwritten(target, tmp, replaced)
            _swap_or_replace(tmp, written, target, replaced)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_folders_in_the_way(target: Path, written: list[Path]) -> None:
    """Raise ``IsADirectoryError`` (``target`` untouched) where the save writes a file whose name is a folder in
    ``target``: the swap would drop that folder and what it holds, where PEFT's own save fails writing the file."""
    for relative in written:
        there = target / relative
        if there.is_dir() and not there.is_symlink():
            raise IsADirectoryError(
                errno.EISDIR, f"cannot save into {target}: {relative} there is a folder, where the save writes a file",
                str(there),
            )


def _swap_or_replace(tmp: Path, written: list[Path], target: Path, replaced: Optional[Callable[[str], bool]]) -> None:
    """Swap the complete folder ``tmp`` in as ``target``; where the swap fails for the folder's place (a bind mount
    :func:`os.path.ismount` cannot see, say) copy the written files into ``target`` and replace them there."""
    _fsync_tree(tmp)
    cwd = Path.cwd().resolve() if os.path.isdir(".") else None
    try:
        _swap_in(tmp, target)
    except OSError as err:
        if err.errno not in _IN_PLACE_ERRORS or not target.is_dir():
            raise
        _warn_in_place(target, f"the swap failed: {err.strerror}")
        staged = target / f"{_TMP_TAG}{_owner_tag()}"
        try:
            for relative in written:  # copied: `tmp` may lie on another file system
                (staged / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tmp / relative, staged / relative, follow_symlinks=False)
            _replace_in_place(staged, written, target, replaced)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return
    _fsync_path(target.parent)
    if cwd is not None and (cwd == target or target in cwd.parents):
        os.chdir(target / cwd.relative_to(target) if (target / cwd.relative_to(target)).is_dir() else target)


def json_text(record: Any) -> str:
    """``record`` as strict JSON text (indented), every non-finite number as null: ``json.dumps`` writes NaN and
    Infinity, which are not JSON (``jq`` and strict parsers refuse them)."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(record), indent=2, allow_nan=False)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``target`` to write; when the block ends normally it replaces ``target``
    at once (``os.replace``). A reader, or a rerun after a kill, sees the old file or the new one, never half of one;
    if the block raises, ``target`` is untouched, and no temporary file is left behind either way.

    The file gets the mode ``open(target, "w")`` gives: an existing target's, else 0666 less the umask (readable
    by the group on a shared cluster, where ``mkstemp``'s 0600 was not). It is fsynced before the rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
    try:
        if target.is_file():
            tmp.chmod(target.stat().st_mode & 0o777)
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


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


def check_adapter_folder(model_id: str | os.PathLike, subfolder: Optional[str], model: Any) -> Optional[Path]:
    """Raise a clear error before PEFT loads a local GiVA folder that is incomplete, edited or mixes two saves.

    Returns the weights file the config's checksum covers (``None`` for folders this does not check). Hub ids
    and folders of other PEFT methods pass through unchanged (PEFT reports on those). ``model`` is the base model the
    adapter is loaded into (its class is checked against the config's ``task_type``, its embedding layers name the
    tensors PEFT may have saved of them).
    """
    return _checked_folder(model_id, subfolder, model)[0]


def checked_adapter_tensors(folder: str | os.PathLike, model: Any) -> dict[str, Any]:
    """The tensors of a local GiVA adapter folder, checked as :func:`check_adapter_folder` checks them (read once)."""
    weights, tensors = _checked_folder(folder, None, model)
    if weights is None:
        raise CheckpointError(f"{folder} is not a local GiVA adapter folder")
    return tensors


def _checked_folder(model_id: str | os.PathLike, subfolder: Optional[str], model: Any) -> tuple[Optional[Path], dict[str, Any]]:
    """:func:`check_adapter_folder`'s checks: the weights file and the tensors read from it (none: not checked)."""
    if not looks_local(model_id):
        return None, {}
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
    if "peft_type" not in config:
        raise CheckpointError(f"{config_file} has no peft_type field: not a PEFT adapter config (edited or truncated?)")
    if config.get("peft_type") != GIVA_TYPE:
        return None, {}
    present = [folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()]
    if not present:
        raise CheckpointError(
            f"GiVA adapter folder {folder} has {CONFIG_NAME} but no {WEIGHTS_NAMES[0]}: the weights file is missing"
        )
    expected = config.get(CHECKSUM_KEY)
    if expected is None:
        weights = present[0]
        warnings.warn(
            f"{config_file} records no {CHECKSUM_KEY}, so {weights.name} is loaded unchecked (saved by an older giva, "
            "or the field was deleted): an edited or mixed folder would not be detected. Save the adapter again to record it.",
            stacklevel=5,  # the caller of PeftModel.from_pretrained / load_adapter
        )
    else:
        weights = next((path for path in present if sha256_file(path) == expected), None)
        if weights is None:
            raise CheckpointError(
                f"{present[0]} does not match {config_file} (sha256 differs from the recorded {CHECKSUM_KEY}): the folder "
                "mixes files of two different saves; save the adapter again"
            )
        if weights != present[0]:
            logger.warning(
                "%s is left from an earlier save (the checksum in %s covers %s): loading %s; saving the adapter again "
                "removes it", present[0], CONFIG_NAME, weights.name, weights.name,
            )
    tensors = check_contents(config_file, config, weights, embedding_layers(model))
    _check_task_type(config_file, config, model)
    return weights, tensors


# Per-layer tensors a GiVA checkpoint holds (keys ``base_model.model.<layer>.<name>``).
# giva_core: the r x r core of adapters made with GivaConfig.core (trained, like the vectors).
_BASES, _VECTORS, _SEEDED_CRC = ("giva_A", "giva_B"), ("giva_lambda_s", "giva_lambda_o", "giva_core"), "giva_seeded_crc32"
_TRAINABLE_TOKENS = ".token_adapter.trainable_tokens_delta"  # what PEFT saves of a trainable_token_indices layer
PEFT_PREFIX = "base_model.model."  # PeftModel's prefix of every saved key


def embedding_layers(model: Any) -> frozenset[str]:
    """The parameters (names in the base model: ``lm_head.weight``) of the embedding layers PEFT saves whole.

    PEFT writes them with ``save_pretrained(save_embedding_layers=True)``, and by itself (with a warning) under the
    default ``"auto"`` after ``resize_token_embeddings`` or when an embedding layer is targeted: the parameters of the
    model's ``get_input_embeddings()`` and ``get_output_embeddings()`` modules, found by identity among the named
    modules as PEFT's ``get_embedding_layer_name`` finds them (``model.embed_tokens``, ``lm_head``, GPT-2's
    ``transformer.wte``, BERT's ``bert.embeddings.word_embeddings``). Only the embedding's own parameters: a GiVA
    layer wrapping it (a targeted ``lm_head``) adds tensors of its own, which are no embedding's.
    """
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layer = getattr(model, getter)()
        except (AttributeError, NotImplementedError):  # not a transformers model, or one without that embedding
            continue
        if layer is not None:
            layers.append(layer)
    return frozenset(
        f"{name.removeprefix(PEFT_PREFIX)}.{param}"
        for name, module in model.named_modules() if any(module is layer for layer in layers)
        for param, _ in _unwrapped(module).named_parameters(recurse=False)
    )


def _unwrapped(module: Any) -> Any:
    """The embedding layer a PEFT layer or wrapper holds (a GiVA layer's ``base_layer``, the ``original_module`` of
    trainable tokens or ``modules_to_save``), else ``module``."""
    for attribute in ("base_layer", "original_module"):
        inner = getattr(module, attribute, None)
        if inner is not None and inner is not module and hasattr(inner, "named_parameters"):
            return _unwrapped(inner)
    return module


# Where PEFT saves an embedding's parameters inside the layer wrapping it: a tuner layer targeting it (GiVA, LoRA),
# trainable tokens (``trainable_token_indices``).
_EMBEDDING_WRAPPERS = (".base_layer", ".token_adapter.base_layer")


def embedding_parameter(key: str, embeddings: frozenset[str]) -> Optional[str]:
    """The embedding parameter (see :func:`embedding_layers`) whose values the saved tensor ``key`` holds, or ``None``.

    ``<module>.weight`` of an embedding module, or ``<module>.base_layer.weight`` where a GiVA / PEFT layer wrapped
    it at save time (``<module>.token_adapter.base_layer.weight`` under trainable tokens); any other tensor under the
    module's name (a GiVA layer's ``lm_head.giva_A``) is none."""
    module, _, param = key.removeprefix(PEFT_PREFIX).rpartition(".")
    for wrapper in _EMBEDDING_WRAPPERS:
        if module.endswith(wrapper) and f"{module.removesuffix(wrapper)}.{param}" in embeddings:
            return f"{module.removesuffix(wrapper)}.{param}"
    return f"{module}.{param}" if f"{module}.{param}" in embeddings else None


def read_weights(weights: Path) -> dict[str, Any]:
    """All tensors of an adapter weights file (on CPU); a truncated, empty or corrupt file is a one-line error."""
    import torch

    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(weights), device="cpu")
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors' and pickle's errors have no common base class
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{weights} cannot be read ({os.path.getsize(weights)} bytes: {detail}): the file is truncated or corrupt; "
            "save the adapter again"
        ) from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{weights} is not an adapter weights file: expected a dict of tensors")
    return tensors


def check_contents(config_file: Path, config: dict[str, Any], weights: Path, embeddings: frozenset[str]) -> dict[str, Any]:
    """The fields and tensors of a GiVA folder are what a save writes: one-line errors naming the file and field.

    Returns the tensors. Checked: ``r`` present and positive; ``A`` stored in the config's ``bases_dtype``, ``B`` in fp32;
    vectors in floating point; no NaN / inf; no tensor other than GiVA's per-layer ones, ``modules_to_save``,
    (with ``trainable_token_indices``) the trainable tokens' rows, (with ``bias`` other than ``"none"``) biases, and
    the parameters of the embedding layers PEFT saves whole: ``embeddings`` names them (:func:`embedding_layers` of
    the model the folder is loaded into; :func:`embedding_parameter`).
    """
    r = config.get("r")
    if "r" not in config:
        raise CheckpointError(f"{config_file} has no field 'r' (the GiVA rank): the config was edited or truncated")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CheckpointError(f"{config_file}: field 'r' must be an int >= 1, got {r!r}")
    bases_dtype = config.get("bases_dtype", "float32")
    tensors = read_weights(weights)
    heads = set(config.get("modules_to_save") or [])
    tokens = config.get("trainable_token_indices") is not None
    for key, tensor in tensors.items():
        kind = key.rsplit(".", 1)[-1]
        expected = bases_dtype if kind == "giva_A" else "float32"  # bases_dtype is A's; B is always stored in fp32
        if kind in _BASES and str(tensor.dtype) != f"torch.{expected}":
            stored = str(tensor.dtype).removeprefix("torch.")
            raise CheckpointError(
                f"{weights}: {key} is stored as {stored}, but {config_file} says bases_dtype={bases_dtype!r}; one of the "
                "two was edited: save the adapter again" if kind == "giva_A" else
                f"{weights}: {key} is stored as {stored}, but GiVA saves B in float32 (bases_dtype sets A's dtype only); "
                "the file was edited: save the adapter again"
            )
        if kind in _VECTORS and not tensor.is_floating_point():
            raise CheckpointError(f"{weights}: {key} is stored as {tensor.dtype}, expected floating point")
        known = kind in (*_BASES, *_VECTORS, _SEEDED_CRC) or (kind == "bias" and config.get("bias", "none") != "none")
        # PEFT's trainable tokens (GivaConfig.trainable_token_indices): the trained rows of an embedding layer.
        known = known or (tokens and key.endswith(_TRAINABLE_TOKENS)) or embedding_parameter(key, embeddings) is not None
        if not known and not any(f".{head}." in f".{key}" for head in heads):  # a module name or a dotted path
            raise CheckpointError(
                f"{weights} holds a tensor that is not part of a GiVA adapter: {key!r} (expected per-layer "
                f"{', '.join((*_BASES, *_VECTORS))}, a module of modules_to_save={sorted(heads)}"
                + (f", {_TRAINABLE_TOKENS.lstrip('.')} of trainable_token_indices" if tokens else "")
                + f" from {config_file}, or an embedding layer PEFT saves whole: {sorted(embeddings)})"
            )
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise CheckpointError(f"{weights}: {key} holds NaN or inf values; the adapter cannot be loaded exactly")
    return tensors


# task_type -> what the model it is loaded into must have (PEFT's task wrappers call these).
_TASK_NEEDS = {"CAUSAL_LM": "prepare_inputs_for_generation", "SEQ_2_SEQ_LM": "prepare_inputs_for_generation"}


def _check_task_type(config_file: Path, config: dict[str, Any], model: Any) -> None:
    task_type = config.get("task_type")
    needed = _TASK_NEEDS.get(task_type or "")
    if needed and not callable(getattr(model, needed, None)):
        raise CheckpointError(
            f"{config_file}: task_type={task_type!r} needs a generative model, but the base model is a "
            f"{type(model).__name__}; load it into the model class it was saved from, or fix task_type"
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
def checked_load(model_id: str | os.PathLike, subfolder: Optional[str], model: Any) -> Iterator[None]:
    """Check the folder before PEFT reads it, once per load (``from_pretrained`` calls ``load_adapter`` inside).

    Inside the block, PEFT's ``load_peft_weights`` of this folder reads the weights file the checksum covers
    (see :func:`load_peft_weights`), also where a file of the other format from an earlier save lies beside it.
    """
    if _checking.get():
        yield
        return
    weights = check_adapter_folder(model_id, subfolder, model)
    token = _checking.set(True)
    override = _verified.set(weights)
    try:
        yield
    finally:
        _verified.reset(override)
        _checking.reset(token)


def load_peft_weights(original: Callable[..., dict], model_id: Any, *args: Any, **kwargs: Any) -> dict:
    """PEFT's ``load_peft_weights``, reading the checked weights file where PEFT would pick another one.

    PEFT prefers ``adapter_model.safetensors`` whenever it exists; when the checksum covers the ``.bin`` beside it,
    PEFT is pointed at a private folder holding only a link to the ``.bin``.
    """
    weights = _verified.get()
    if weights is None or weights.name == WEIGHTS_NAMES[0] or not looks_local(model_id):
        return original(model_id, *args, **kwargs)
    folder = Path(os.path.expanduser(os.fspath(model_id)))
    folder = folder / kwargs["subfolder"] if kwargs.get("subfolder") else folder
    if folder.resolve() != weights.parent.resolve():
        return original(model_id, *args, **kwargs)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="giva-load-") as view:
        os.symlink(weights.resolve(), Path(view) / weights.name)
        return original(view, *args, **{k: v for k, v in kwargs.items() if k != "subfolder"})


# The GivaConfig fields that decide which tensors an adapter has and their shapes.
SHAPING_FIELDS = ("r", "variant", "core", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                  "adapt_blocks", "block_sizes", "fan_in_fan_out")


def _comparable(value: Any) -> Any:
    return sorted(map(str, value)) if isinstance(value, (list, set, tuple)) else value  # a JSON list, a PEFT set


def config_differences(model: Any, model_id: Any, subfolder: Optional[str], adapter_name: str) -> Optional[str]:
    """Why loading a local GiVA folder into the *existing* adapter ``adapter_name`` may have been refused: the fields
    of :data:`SHAPING_FIELDS` in which that adapter's config and the folder's differ, as a sentence (None if none).

    PEFT loads into an adapter that exists (the Trainer's ``resume_from_checkpoint`` does) without reading the saved
    config, so a model built with another ``r`` is refused by the shape check, whose message can only suspect another
    base model."""
    own = getattr(model, "peft_config", {}).get(adapter_name)
    if getattr(own, "peft_type", None) != GIVA_TYPE or not looks_local(model_id):
        return None
    folder = Path(os.path.expanduser(os.fspath(model_id)))
    try:
        saved = _read_config((folder / subfolder if subfolder else folder) / CONFIG_NAME)
    except (OSError, CheckpointError):
        return None
    differ = [f"{name}={getattr(own, name)!r} here, {saved[name]!r} in the checkpoint" for name in SHAPING_FIELDS
              if name in saved and _comparable(getattr(own, name, None)) != _comparable(saved[name])]
    if not differ:
        return None
    return (f"The adapter {adapter_name!r} it was loaded into already existed, built with another GivaConfig than the "
            f"checkpoint's ({'; '.join(differ)}): build the model with the checkpoint's config "
            f"(GivaConfig.from_pretrained of the folder), or load the folder with PeftModel.from_pretrained.")


def check_load_into_existing(model: Any, model_id: Any, subfolder: Optional[str], adapter_name: str) -> None:
    """Refuse, before anything loads, a local GiVA folder loaded into the *existing* adapter ``adapter_name`` (the
    Trainer's ``resume_from_checkpoint`` does that) whose bases would not keep the checkpoint's values: an adapter
    storing them in a narrower ``bases_dtype`` (``bfloat16`` here, ``float32`` saved) rounded the saved ``A`` with
    nothing said, and every later save kept the rounded one. A folder this cannot read is left to the load's checks."""
    own = getattr(model, "peft_config", {}).get(adapter_name)
    if getattr(own, "peft_type", None) != GIVA_TYPE or not looks_local(model_id):
        return
    folder = Path(os.path.expanduser(os.fspath(model_id)))
    config_file = (folder / subfolder if subfolder else folder) / CONFIG_NAME
    try:
        saved = _read_config(config_file).get("bases_dtype", "float32")
    except (OSError, CheckpointError):
        return
    from .serving import BASES_DTYPES

    here = own.bases_dtype
    if here in BASES_DTYPES and saved in BASES_DTYPES and BASES_DTYPES[here].itemsize < BASES_DTYPES[saved].itemsize:
        raise ValueError(
            f"loading {config_file.parent} into the existing adapter {adapter_name!r} would round its bases: "
            f"bases_dtype={here!r} here, {saved!r} in the checkpoint; build the model with the checkpoint's config "
            "(GivaConfig.from_pretrained of the folder), or load the folder with PeftModel.from_pretrained"
        )


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
    extra = arguments.get("kwargs") or {}
    download = extra.get("download_kwargs") or getattr(load_config, "download_kwargs", None) or {}
    if arguments.get("peft_config") is None:  # transformers adds adapter_kwargs to the download kwargs then
        download = {**download, **(arguments.get("adapter_kwargs") or {})}
    # ``subfolder=`` itself is no LoadStateDictConfig field: transformers raises its TypeError (for every PEFT
    # method) once this check of the folder it names has passed, not a missing config in the folder above it.
    subfolder = extra.get("subfolder") or download.get("subfolder") or None
    adapter_name = arguments.get("adapter_name") or "default"
    existed = adapter_name in (getattr(model, "peft_config", None) or {})
    with checked_load(model_id, subfolder, model):
        try:
            # transformers 4.x loads the weights inside load_adapter through PEFT's set_peft_model_state_dict, so
            # GiVA's load checks can raise in ``original`` already, after the adapter was injected: delete it then too
            result = original(model, *args, **kwargs)
            config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
            if config is None or config.peft_type != GIVA_TYPE:
                return result
            folder = Path(os.path.expanduser(os.fspath(model_id)))
            folder = folder / subfolder if subfolder else folder
            _reload_through_peft(model, folder, adapter_name)
        except Exception:
            # only a GiVA adapter this call injected (``original`` may also fail before injecting anything)
            config = (getattr(model, "peft_config", None) or {}).get(adapter_name)
            if not existed and config is not None and config.peft_type == GIVA_TYPE:
                _delete_adapter(model, adapter_name)
            raise
    forget_checksum(model, adapter_name)
    return result


def _reload_through_peft(model: Any, folder: Path, adapter_name: str) -> None:
    """Load ``folder``'s weights into ``model``'s adapter with PEFT's loader (the same values transformers wrote),
    so that GiVA's load checks run; they raise ``ValueError`` naming the layers.

    The saved keys carry ``PeftModel``'s ``base_model.model.`` prefix, which the bare transformers model lacks:
    it is stripped first, as transformers' own PEFT integration does before ``set_peft_model_state_dict``
    (PEFT looks up a ``modules_to_save`` head's tensors under the model's module names, e.g. ``classifier.weight``).
    """
    from peft.utils import load_peft_weights as peft_load_peft_weights
    from peft.utils import set_peft_model_state_dict

    weights = load_peft_weights(peft_load_peft_weights, str(folder), device="cpu")
    weights = {key.removeprefix(PEFT_PREFIX): value for key, value in weights.items()}
    set_peft_model_state_dict(model, weights, adapter_name=adapter_name)


def _delete_adapter(model: Any, adapter_name: str) -> None:
    """What transformers' ``model.delete_adapter`` does (it asks for PEFT >= 0.22, GiVA works from 0.21):
    the adapter's tensors leave every layer and its config leaves the model; the emptied wrappers pass through."""
    from peft.functional import delete_adapter

    delete_adapter(model, adapter_name=adapter_name, prefix=f"{GIVA_TYPE.lower()}_")  # as transformers names it
    model.peft_config.pop(adapter_name, None)
    if not model.peft_config:
        del model.peft_config
        model._hf_peft_config_loaded = False
