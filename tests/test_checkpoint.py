"""Atomic saving, the weights checksum and the checks before loading a GiVA adapter folder."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ckpt_child import adapter_model, labels_for, refuse_swaps
from peft import LoraConfig, PeftModel, get_peft_model

from giva import CheckpointError, checkpoint
from tiny_models import text_batches, tiny_bert

CHILD = Path(__file__).with_name("ckpt_child.py")


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=text_batches(n=1)[0]["input_ids"]).logits


def reload(folder: Path) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(tiny_bert(), str(folder)).eval())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.giva-"))


def test_save_reload_is_exact_and_records_the_checksum(tmp_path):
    model = adapter_model(1).eval()
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["weights_sha256"] == checkpoint.sha256_file(folder / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(tiny_bert(), str(folder))
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.peft_config["default"].weights_sha256 is None  # describes the files, not the model in memory
    assert model.peft_config["default"].weights_sha256 is None
    assert leftovers(folder) == []


def test_save_keeps_the_files_it_does_not_rewrite(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("kept")
    adapter_model(1).save_pretrained(str(folder))
    assert (folder / "tokenizer.json").read_text() == "{}" and (folder / "notes" / "a.txt").read_text() == "kept"
    assert (folder / "adapter_model.safetensors").exists()


def test_save_keeps_symbolic_links_as_links_to_the_same_target(tmp_path):
    """Links to folders too (``os.walk`` lists them among the folders without entering them), and dangling ones."""
    shared = tmp_path / "shared_tokenizer"
    shared.mkdir()
    (shared / "vocab.txt").write_text("a\nb\n")
    folder = tmp_path / "adapter"
    (folder / "notes").mkdir(parents=True)
    (folder / "tokenizer").symlink_to(shared, target_is_directory=True)
    (folder / "notes" / "relative").symlink_to(Path("..", "..", "shared_tokenizer"), target_is_directory=True)
    (folder / "vocab.txt").symlink_to(shared / "vocab.txt")
    (folder / "dangling").symlink_to(tmp_path / "nowhere")
    links = ("tokenizer", "notes/relative", "vocab.txt", "dangling")
    before = {name: os.readlink(folder / name) for name in links}
    adapter_model(1).save_pretrained(str(folder))
    assert {name: os.readlink(folder / name) for name in links} == before  # readlink raises for a non-link
    assert (folder / "notes" / "relative" / "vocab.txt").read_text() == "a\nb\n"
    assert sorted(p.name for p in shared.iterdir()) == ["vocab.txt"]  # the targets are not touched


def test_a_failing_save_leaves_the_folder_unchanged(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    adapter_model(1).save_pretrained(str(folder))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("peft.peft_model.safe_save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        adapter_model(2).save_pretrained(str(folder))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert leftovers(folder) == []


def test_lora_models_keep_peft_own_save(tmp_path):
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(str(tmp_path / "lora"))
    assert "weights_sha256" not in json.loads((tmp_path / "lora" / "adapter_config.json").read_text())


def test_weights_of_another_save_are_detected_at_load(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    adapter_model(1).save_pretrained(str(first))
    adapter_model(2).save_pretrained(str(second))
    (first / "adapter_model.safetensors").write_bytes((second / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"first/adapter_model.safetensors does not match .*adapter_config.json"):
        PeftModel.from_pretrained(tiny_bert(), str(first))


def test_missing_weights_or_folder_name_the_folder_and_the_file(tmp_path):
    folder = tmp_path / "adapter"
    adapter_model(1).save_pretrained(str(folder))
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"adapter folder .*adapter has adapter_config.json but no adapter_model"):
        PeftModel.from_pretrained(tiny_bert(), str(folder))
    with pytest.raises(CheckpointError, match="no such adapter folder: .*nope"):
        PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty holds no adapter_config.json"):
        PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "empty"))
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json is not a valid adapter config"):
        PeftModel.from_pretrained(tiny_bert(), str(folder))


def test_an_interrupted_fallback_swap_is_put_back_on_load(tmp_path):
    folder = tmp_path / "adapter"
    model = adapter_model(1).eval()
    model.save_pretrained(str(folder))
    # The state after the fallback's first rename, with the saver dead (pid 999999999 does not run).
    folder.rename(tmp_path / ".adapter.giva-old-999999999-abcd")
    (tmp_path / ".adapter.giva-tmp-999999999-ef01").mkdir()
    assert torch.equal(reload(folder), logits(model))
    assert leftovers(folder) == []  # and the dead saver's temp folder is gone


def test_saving_into_a_file_says_so(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file"):
        with checkpoint.atomic_directory(tmp_path / "f"):
            pass


@pytest.fixture(scope="module")
def saver():
    """One child process (imports once) that forks a saver per command and SIGKILLs it after the given delay."""
    child = subprocess.Popen(
        [sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=CHILD.parent
    )
    assert child.stdout.readline().strip() == "ready"

    def command(folder: Path, seed: int, how: str, delay: float) -> tuple[str, float]:
        child.stdin.write(f"save {folder} {seed} {how} {delay:.4f}\n")
        child.stdin.flush()
        outcome, seconds = child.stdout.readline().split()
        return outcome, float(seconds)

    yield command
    child.stdin.close()
    child.wait(timeout=60)


@pytest.mark.parametrize("how, n_trials", [("peft", 25), ("cli", 6), ("fallback", 6)])
def test_sigkill_at_any_point_of_a_save_leaves_the_old_or_the_new_adapter(tmp_path, saver, how, n_trials):
    """Kill a saver at spread-out points of ``n_trials`` saves; after each, the folder is the old or the new adapter."""
    folder, rng = tmp_path / "adapter", random.Random(0)
    adapter_model(1).save_pretrained(str(folder))
    if how == "cli":
        (folder / "labels.json").write_text(json.dumps(labels_for(1)))
    references = {}

    def reference(seed: int) -> torch.Tensor:
        if seed not in references:
            references[seed] = logits(adapter_model(seed).eval())
        return references[seed]

    outcome, duration = saver(folder, 1000, how, 30.0)  # one uninterrupted save: how long a save takes here
    assert outcome == "completed" and torch.equal(reload(folder), reference(1000))
    current, counts = 1000, {"old": 0, "new": 0}
    for trial in range(n_trials):
        seed = 2000 + trial
        delay = duration * 1.3 * (trial + rng.random()) / n_trials  # spread over the whole save
        outcome, _ = saver(folder, seed, how, delay)
        got = reload(folder)
        is_new = torch.equal(got, reference(seed))
        assert is_new or torch.equal(got, reference(current)), f"trial {trial}: the folder matches neither adapter"
        assert is_new or outcome == "killed"
        if how == "cli":
            assert json.loads((folder / "labels.json").read_text()) == labels_for(seed if is_new else current)
        counts["new" if is_new else "old"] += 1
        current = seed if is_new else current
    adapter_model(3).save_pretrained(str(folder))  # the next save cleans what the killed savers left
    assert leftovers(folder) == []
    assert counts["old"] >= 1 and counts["new"] >= 1, counts  # the kills landed before and after the swap


def test_the_child_script_is_not_collected():
    assert not os.path.basename(CHILD).startswith("test_")


def test_saving_into_the_working_directory_keeps_it_usable(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    folder.mkdir()
    monkeypatch.chdir(folder)
    model = adapter_model(1).eval()
    model.save_pretrained(".")
    assert Path.cwd() == folder and Path("adapter_model.safetensors").is_file()  # the cwd follows the swapped folder
    assert torch.equal(reload(folder), logits(model))


def test_a_symlinked_folder_stays_a_link(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    adapter_model(1).save_pretrained(str(real))
    link.symlink_to(real, target_is_directory=True)
    model = adapter_model(2).eval()
    model.save_pretrained(str(link))
    assert link.is_symlink() and torch.equal(reload(real), logits(model))


@pytest.mark.parametrize("how", ["parent-refuses-entries", "mount-point", "swap-ebusy"])
def test_a_folder_that_cannot_be_swapped_is_saved_file_by_file(tmp_path, monkeypatch, caplog, how):
    """Stock PEFT saves into a mount point or a folder whose parent refuses new entries; giva's atomic save failed
    there (PermissionError making the staging folder, OSError EBUSY from the swap). It now replaces the files one by
    one, with a warning: the user's files are kept, what a swap drops (the weights file of the other format) is
    dropped, no staging folder is left, and the adapter reloads exactly."""
    folder = tmp_path / "adapter"
    adapter_model(1).save_pretrained(str(folder), safe_serialization=False)
    (folder / "notes.txt").write_text("mine")
    refuse_swaps(monkeypatch, folder, how)
    model = adapter_model(2).eval()
    with caplog.at_level(logging.WARNING, logger="giva.checkpoint"):
        model.save_pretrained(str(folder))
    reason = {"parent-refuses-entries": "refuses new entries", "mount-point": "is a mount point", "swap-ebusy": "busy"}
    assert "cannot be swapped whole" in caplog.text and reason[how] in caplog.text, caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                        "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine" and leftovers(folder) == []
    assert torch.equal(reload(folder), logits(model))
    third = adapter_model(3).eval()  # and a save into the fresh in-place folder again
    third.save_pretrained(str(folder), safe_serialization=False)
    assert torch.equal(reload(folder), logits(third)) and not (folder / "adapter_model.safetensors").exists()



@pytest.mark.parametrize("how", ["parent-refuses-entries", "mount-point"])
def test_an_in_place_save_leaves_the_kept_files_untouched(tmp_path, monkeypatch, how):
    """A save into a folder that cannot be swapped hard-linked (or copied) every file it keeps into its staging folder,
    only to learn what to delete: 50 links for a 50-file checkpoint folder. It now decides what to drop from the
    folder itself: no link or copy of a kept file is made, kept files keep their inode and mtime, and what a swap
    drops (the weights file of the other format) is still dropped."""
    folder = tmp_path / "adapter"
    adapter_model(1).save_pretrained(str(folder), safe_serialization=False)
    (folder / "notes.txt").write_text("mine")
    (folder / "checkpoint-500").mkdir()
    for i in range(50):
        (folder / "checkpoint-500" / f"f{i}").write_bytes(b"x" * 100)
    kept = [folder / "notes.txt", *sorted((folder / "checkpoint-500").iterdir())]
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns, path.stat().st_nlink) for path in kept}
    refuse_swaps(monkeypatch, folder, how)
    links, copies = [], []
    real_link, real_copy2 = os.link, shutil.copy2
    monkeypatch.setattr(os, "link", lambda src, dst, *a, **k: (links.append(src), real_link(src, dst, *a, **k))[1])
    monkeypatch.setattr(shutil, "copy2", lambda src, dst, *a, **k: (copies.append(Path(src).name), real_copy2(src, dst, *a, **k))[1])
    model = adapter_model(2).eval()
    model.save_pretrained(str(folder))
    assert links == [] and copies == ["README.md"], (links, copies)  # README.md: the model card PEFT updates
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns, path.stat().st_nlink) for path in kept} == before
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                        "checkpoint-500", "notes.txt"]
    assert leftovers(folder) == [] and torch.equal(reload(folder), logits(model))

def test_a_folder_another_process_makes_during_a_save_is_replaced_not_an_error(tmp_path, monkeypatch):
    """Two ranks saving the same new folder: the one that found no folder and then lost the rename raised
    OSError ENOTEMPTY (a reviewer's torchrun run: 1 of 80 saves). Here another save makes the folder just before this
    one's rename; this save replaces it (the last one wins, as PEFT's) and the folder loads as this model."""
    folder = tmp_path / "adapter"
    other = adapter_model(1).eval()
    real_rename = os.rename
    raced = []

    def rename(src, dst, *args, **kwargs):
        if Path(dst) == folder and not folder.exists() and not raced:
            raced.append(dst)
            other.save_pretrained(str(folder))  # the other rank wins the race to the new folder
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    model = adapter_model(2).eval()
    model.save_pretrained(str(folder))
    assert raced and leftovers(folder) == [] and torch.equal(reload(folder), logits(model))


def test_an_in_place_save_cut_off_half_way_is_detected_and_its_staging_folder_removed(tmp_path, monkeypatch):
    """Replacing files one by one is not atomic: a save killed between the weights and the config leaves new weights
    beside the old config, which the weights checksum refuses; the staging folder of the dead saver is removed by the
    next load."""
    folder = tmp_path / "adapter"
    adapter_model(1).save_pretrained(str(folder))
    refuse_swaps(monkeypatch, folder, "swap-ebusy")
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "adapter_config.json":
            raise KeyboardInterrupt  # killed before the config is in
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        adapter_model(2).save_pretrained(str(folder))
    monkeypatch.setattr(os, "replace", real_replace)
    dead = folder / ".giva-tmp-999999999-abcd"  # what a killed saver leaves (pid 999999999 does not run)
    dead.mkdir()
    with pytest.raises(CheckpointError, match="does not match .*adapter_config.json"):
        PeftModel.from_pretrained(tiny_bert(), str(folder))
    assert not dead.exists()
