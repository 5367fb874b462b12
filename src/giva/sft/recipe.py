"""`giva sft --config FILE`: a recipe file as command-line flags, which the flags given beside it override.

The file is a YAML (or JSON) mapping of flag names, spelt as on the command line or with underscores, to values:
``true`` / ``false`` for a switch, a list for a comma-separated flag, ``null`` for a flag's default. A run's own
``sft_result.json`` (or ``giva_sft_options.json``) is a recipe too: its ``options`` are the run's flags, less those
about the state of its folders (``--resume``, ``--overwrite``), so ``giva sft --config out/sft_result.json
--output-dir out2/`` runs it again. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A run's record holds these, but they say what was in its folders, not how to train: a rerun decides them again.
FOLDER_STATE = ("resume", "overwrite")
EMPTY = {"report_to": "none"}  # a flag whose empty list (as a run's record holds it) has a name on the command line


def recipe_flags(path: str, actions: dict[str, Any]) -> list[str]:
    """The flags ``path`` sets, as command-line words, checked against ``actions`` (the command's argparse actions by
    destination). A ValueError names the file and, for a bad entry, its key."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--config {path!r}: no such file")
    try:
        settings = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"--config {path!r}: not UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else str(file)
        raise ValueError(f"{where}: not valid YAML or JSON ({getattr(err, 'problem', None) or err})") from None
    if isinstance(settings, dict) and isinstance(settings.get("options"), dict) and (
            "versions" in settings or "data_sha256" in settings):  # a run's record: its flags
        settings = {k: v for k, v in settings["options"].items() if k not in FOLDER_STATE}
        if "progress" in settings:
            settings["no_progress"] = not settings.pop("progress")
    if not isinstance(settings, dict):
        raise ValueError(f"{file}: expected a mapping of giva sft flags to values (YAML or JSON), got "
                         f"{type(settings).__name__}")
    words: list[str] = []
    for key, value in settings.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        flags = [] if action is None else [f for f in action.option_strings if f.startswith("--")]
        if not flags or dest in ("config", "help"):
            raise ValueError(f"{file}: {key!r} is not a flag of giva sft (its flags: giva sft --help)")
        flag = flags[0]
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise ValueError(f"{file}: {key!r} ({flag}) is a switch: expected true or false, got {value!r}")
            words += [flag] if value else []
        elif value is not None:
            if isinstance(value, bool) or isinstance(value, dict) or (
                    isinstance(value, list) and not all(isinstance(v, (str, int, float)) for v in value)):
                raise ValueError(f"{file}: {key!r} ({flag}) takes a value, got {value!r}")
            if value == [] and dest in EMPTY:
                value = EMPTY[dest]
            elif value == []:
                raise ValueError(f"{file}: {key!r} ({flag}) takes a value, got an empty list")
            words += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return words
