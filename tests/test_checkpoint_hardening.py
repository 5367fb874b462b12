"""Hand-edited, mixed and foreign-host adapter folders (issue 24, items 3 and 8, and the shared-file-system
ownership of interrupted saves): each is loaded exactly, or refused in one line naming the file and field."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import warnings
import zlib
from pathlib import Path

import peft
import pytest
import torch
from ckpt_child import adapter_model
from packaging.version import Version
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from giva import CheckpointError, GivaConfig, checkpoint
from tiny_models import text_batches, tiny_bert


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=text_batches(n=1)[0]["input_ids"]).logits


def load(folder: Path) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(tiny_bert(), str(folder)).eval())


# --------------------------------------------------------------- item 3: saves of both weights formats


def test_switching_safe_serialization_leaves_only_the_new_weights_file(tmp_path):
    folder = tmp_path / "adapter"
    adapter_model(1).save_pretrained(str(folder))
    second = adapter_model(2).eval()
    second.save_pretrained(str(folder), safe_serialization=False)
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("adapter_model")) == ["adapter_model.bin"]
    assert torch.equal(load(folder), logits(second))
    third = adapter_model(3).eval()
    third.save_pretrained(str(folder))
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("adapter_model")) == ["adapter_model.safetensors"]
    assert torch.equal(load(folder), logits(third))


def test_a_stale_weights_file_is_not_read_and_the_next_save_removes_it(tmp_path):
    """A folder an older giva left: the checksum covers the .bin, a safetensors of an earlier save lies beside it."""
    folder, old = tmp_path / "adapter", tmp_path / "old"
    adapter_model(1).save_pretrained(str(old))
    second = adapter_model(2).eval()
    second.save_pretrained(str(folder), safe_serialization=False)
    shutil.copy2(old / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    assert torch.equal(load(folder), logits(second))  # PEFT alone would read the safetensors (adapter 1)
    second.save_pretrained(str(folder), safe_serialization=False)
    assert not (folder / "adapter_model.safetensors").exists()
    assert torch.equal(load(folder), logits(second))


# ------------------------------------------------------- recover(): saves of other hosts on a shared folder


def test_a_load_never_touches_an_interrupted_or_running_save_of_another_host(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    model = adapter_model(1).eval()
    model.save_pretrained(str(folder))
    other_host = "0123456789ab"
    assert checkpoint._host_tag() != other_host
    # Another machine's save in progress: its temp folder (a PID that means nothing here) beside the target.
    running = tmp_path / f".adapter.giva-tmp-{other_host}-999999999-ef01"
    running.mkdir()
    (running / "adapter_model.safetensors").write_text("being written")
    assert torch.equal(load(folder), logits(model))
    assert running.is_dir() and (running / "adapter_model.safetensors").read_text() == "being written"
    # The same machine between the two renames of the fallback swap: the target is moved aside.
    aside = tmp_path / f".adapter.giva-old-{other_host}-999999999-abcd"
    folder.rename(aside)
    with pytest.raises(CheckpointError, match="moved aside to .*giva-old-0123456789ab.* still running .*another machine"):
        load(folder)
    assert aside.is_dir() and not folder.exists()
    # Once that host is this one (its save really died here), the folder is put back and the leftovers go.
    monkeypatch.setattr(checkpoint, "_host_tag", lambda: other_host)
    assert torch.equal(load(folder), logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_this_hosts_names_record_the_host_and_a_dead_pid_is_recovered(tmp_path):
    folder = tmp_path / "adapter"
    model = adapter_model(1).eval()
    model.save_pretrained(str(folder))
    folder.rename(tmp_path / f".adapter.giva-old-{checkpoint._host_tag()}-999999999-abcd")
    assert torch.equal(load(folder), logits(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ------------------------------------------------------------------------ item 8: hand-edited folders


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A Vr adapter (A stored, B seeded) with a classifier head, saved once."""
    torch.manual_seed(0)
    config = GivaConfig(r=4, target_modules=["query", "value"], init_weights=False, task_type="SEQ_CLS")
    folder = tmp_path_factory.mktemp("saved") / "adapter"
    get_peft_model(tiny_bert(), config).save_pretrained(str(folder))
    return folder


def _edited(saved: Path, tmp_path: Path, config=None, tensors=None, keep_checksum: bool = False) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if tensors is not None:
        state = load_file(folder / "adapter_model.safetensors")
        tensors(state)
        save_file(state, folder / "adapter_model.safetensors")
    if not keep_checksum:
        cfg.pop("weights_sha256")
    (folder / "adapter_config.json").write_text(json.dumps(config(cfg) if config else cfg))
    return folder


A = "base_model.model.bert.encoder.layer.0.attention.self.query.giva_A"
LAMBDA_O = "base_model.model.bert.encoder.layer.1.attention.self.value.giva_lambda_o"


def _nan(state):
    state[LAMBDA_O] = state[LAMBDA_O].clone()
    state[LAMBDA_O][3] = float("nan")


@pytest.mark.parametrize(
    ("config", "tensors", "message"),
    [
        (lambda c: {}, None, "adapter_config.json has no peft_type field"),
        (lambda c: {k: v for k, v in c.items() if k != "r"}, None, "adapter_config.json has no field 'r'"),
        (lambda c: {**c, "r": "4"}, None, "adapter_config.json: field 'r' must be an int >= 1, got '4'"),
        (lambda c: {**c, "task_type": "CAUSAL_LM"}, None,
         "adapter_config.json: task_type='CAUSAL_LM' needs a generative model, but the base model is a BertForSequence"),
        (lambda c: {**c, "bases_dtype": "bfloat16"}, None,
         "adapter_model.safetensors: .*giva_A is stored as float32, but .*adapter_config.json says bases_dtype='bfloat16'"),
        (None, lambda s: s.update({A: (s[A] * 100).to(torch.int32)}),
         "adapter_model.safetensors: .*query.giva_A is stored as int32, but .*bases_dtype='float32'"),
        (None, lambda s: s.update({A.replace("giva_A", "giva_B"): torch.zeros(32, 4, dtype=torch.bfloat16)}),
         "adapter_model.safetensors: .*query.giva_B is stored as bfloat16, but GiVA saves B in float32"),
        (None, _nan, "adapter_model.safetensors: .*layer.1.attention.self.value.giva_lambda_o holds NaN or inf"),
        (None, lambda s: s.update({"base_model.model.extra.weight": torch.zeros(2)}),
         "adapter_model.safetensors holds a tensor that is not part of a GiVA adapter: 'base_model.model.extra.weight'"),
        # An embedding name PEFT knows, but not one of this model (a BERT classifier has no lm_head): still foreign.
        (None, lambda s: s.update({"base_model.model.lm_head.weight": torch.zeros(100, 32)}),
         r"not part of a GiVA adapter: 'base_model.model.lm_head.weight' .*\['bert.embeddings.word_embeddings.weight'\]"),
        # Under the embedding's name, but none of its parameters: a GiVA layer's own tensors were taken for it.
        (None, lambda s: s.update({"base_model.model.bert.embeddings.word_embeddings.something_else": torch.zeros(2)}),
         "not part of a GiVA adapter: 'base_model.model.bert.embeddings.word_embeddings.something_else'"),
    ],
    ids=["empty-config", "r-missing", "r-string", "task-type", "bases-dtype", "A-int32", "B-bf16", "nan-lambda",
         "extra-tensor", "foreign-lm-head", "embedding-other-tensor"],
)
def test_a_hand_edited_folder_is_refused_in_one_line_naming_the_file(saved, tmp_path, config, tensors, message):
    folder = _edited(saved, tmp_path, config, tensors)
    with pytest.raises(CheckpointError, match=message) as error:
        PeftModel.from_pretrained(tiny_bert(), str(folder))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("content", [b"", b"truncated"], ids=["empty", "truncated"])
def test_a_truncated_weights_file_without_a_checksum_is_named(saved, tmp_path, content):
    folder = _edited(saved, tmp_path)
    data = (saved / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2] if content else content)
    with pytest.raises(CheckpointError, match=r"edited/adapter_model.safetensors cannot be read \(\d+ bytes: .*truncated"):
        PeftModel.from_pretrained(tiny_bert(), str(folder))


def test_a_deleted_checksum_warns_like_a_missing_seeded_basis_checksum(saved, tmp_path):
    folder = _edited(saved, tmp_path, tensors=lambda s: s.update({A: s[A] + 0.5}))
    with pytest.warns(UserWarning, match=r"adapter_config.json records no weights_sha256, so adapter_model.safetensors is loaded unchecked"):
        PeftModel.from_pretrained(tiny_bert(), str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        PeftModel.from_pretrained(tiny_bert(), str(saved))  # an intact folder loads without it


@pytest.mark.parametrize(
    ("resized", "config", "save"),
    [
        (True, {}, {}),  # save_embedding_layers="auto": PEFT saves both embeddings itself, with a warning
        (True, {"trainable_token_indices": [100, 105]}, {}),  # TRL's chat-template flow: new tokens, trained rows
        (False, {}, {"save_embedding_layers": True}),
        (False, {}, {"save_embedding_layers": True, "safe_serialization": False}),
    ],
    ids=["resized-auto", "resized-trainable-tokens", "save-embeddings", "save-embeddings-bin"],
)
def test_folders_with_the_embedding_layers_peft_saves_reload_exactly(tmp_path, resized, config, save):
    """PEFT saves whole embedding layers (``lm_head.weight``, ``model.embed_tokens.weight``) with
    ``save_embedding_layers=True``, or by itself after ``resize_token_embeddings``; the tensor check refused every
    such folder as holding "a tensor that is not part of a GiVA adapter", so the adapter could never be loaded."""
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")  # PEFT's "auto" compares the vocabulary with the base's config

    def base() -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        if resized:
            model.resize_token_embeddings(110)  # new rows drawn at random: equal logits need the saved ones
        return model

    torch.manual_seed(2)
    model = get_peft_model(base(), GivaConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM", **config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(1.0)  # "trained" rows of the new tokens
    ids = torch.tensor([[1, 2, 3, 4, 99] + ([100, 105, 107] if resized else [])])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT's "Setting save_embedding_layers to True ..."
        model.save_pretrained(tmp_path / "adapter", **save)
    weights = next((tmp_path / "adapter").glob("adapter_model.*"))
    saved = load_file(weights) if weights.suffix == ".safetensors" else torch.load(weights, weights_only=True)
    assert "base_model.model.lm_head.weight" in saved  # the layers are there: the folder tests what it claims
    loaded = PeftModel.from_pretrained(base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_a_targeted_lm_head_loads_and_only_its_own_weight_counts_as_the_embedding(tmp_path):
    """A folder of an adapter targeting ``lm_head`` holds GiVA's tensors of that layer and, from PEFT, the layer's own
    ``lm_head.base_layer.weight``: it loads exactly. Any other tensor under ``lm_head`` is foreign; the check took
    every ``lm_head.<anything>`` for the embedding layer's."""
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), GivaConfig(
        r=4, init_weights=False, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")).eval()
    ids = torch.tensor([[1, 2, 3, 4, 99]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT's "Setting save_embedding_layers to True ..."
        model.save_pretrained(tmp_path / "adapter")
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, expected)
    for extra in ("lm_head.something_else", "lm_head.lora_A.weight", "model.embed_tokens.extra.weight"):
        shutil.rmtree(tmp_path / "edited", ignore_errors=True)
        folder = _edited(tmp_path / "adapter", tmp_path, tensors=lambda s: s.update({f"base_model.model.{extra}": torch.zeros(2)}))
        with pytest.raises(CheckpointError, match=rf"not part of a GiVA adapter: 'base_model.model.{re.escape(extra)}' "):
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(folder))

@pytest.mark.parametrize(
    "options", [{"bias": "all"}, {"bias": "giva_only"}, {"modules_to_save": ["bert.pooler.dense"]}],
    ids=["bias-all", "bias-giva-only", "dotted-modules-to-save"],
)
def test_folders_with_biases_or_dotted_heads_still_load_exactly(tmp_path, options):
    """The tensor check knows every tensor a save writes: biases (``bias`` other than "none") and heads named by path."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], init_weights=False, **options))
    model.save_pretrained(str(tmp_path / "adapter"))
    assert torch.equal(load(tmp_path / "adapter"), logits(model.eval()))


def test_atomic_file_replaces_the_target_at_once_and_leaves_it_untouched_on_error(tmp_path: Path) -> None:
    """The one writer of single files (run records, federated results and checkpoints): the old content until the
    block ends, the new content after, and no temporary file either way."""
    target = tmp_path / "sub" / "results.json"
    with checkpoint.atomic_file(target) as tmp:
        tmp.write_text("old")
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError, match="killed mid-write"):
        with checkpoint.atomic_file(target) as tmp:
            tmp.write_text("half")
            assert target.read_text() == "old"  # not visible before the block ends
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    with checkpoint.atomic_file(target) as tmp:
        torch.save({"w": torch.ones(2)}, tmp)
    assert torch.equal(torch.load(target)["w"], torch.ones(2))
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]



def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_give_the_modes_open_gives(tmp_path):
    """0666 less the umask for a new file (mkstemp's 0600 hid results from the group on a shared cluster) and an
    existing file's own mode, as ``open(path, "w")`` keeps it; a saved adapter's files and kept sub-folders alike."""
    private, folder = tmp_path / "private.json", tmp_path / "adapter"
    private.write_text("{}")
    private.chmod(0o640)
    (folder / "notes").mkdir(parents=True)
    (folder / "notes").chmod(0o750)
    previous = os.umask(0o002)  # a cluster's group-writable default
    try:
        (tmp_path / "plain.json").write_text("{}")
        for target in (tmp_path / "results.json", private):
            with checkpoint.atomic_file(target) as tmp:
                tmp.write_text("{}")
        adapter_model(1).save_pretrained(str(folder))
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "results.json") == _mode(tmp_path / "plain.json") == 0o664
    assert _mode(private) == 0o640
    # (Not adapter_model.safetensors: safetensors >= 0.8 writes it through its own temp file, 0600 in any folder.)
    assert _mode(folder / "adapter_config.json") == _mode(folder / "README.md") == 0o664
    assert _mode(folder / "notes") == 0o750


def test_atomic_file_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    target, synced = tmp_path / "results.json", []
    target.write_text("old")
    fsync_path = checkpoint._fsync_path
    monkeypatch.setattr(checkpoint, "_fsync_path", lambda path: (synced.append((path, target.read_text())), fsync_path(path)))
    with checkpoint.atomic_file(target) as tmp:
        tmp.write_text("new")
    assert (tmp, "old") in synced and (tmp_path, "new") in synced  # the file before the rename, the folder after


@pytest.mark.parametrize("variant", ["Vr", "VrUr", "VrU2r", "weight"])
def test_bf16_bases_of_every_variant_reload_and_export_exactly(tmp_path, variant):
    """``bases_dtype="bfloat16"`` stores A in bf16 and B (stored by VrUr, VrU2r, weight) in fp32: the load check
    must expect each in its own dtype (it refused every folder with a stored B); reload is bit-exact and the LoRA
    export of the folder matches."""
    from giva.export import export_lora

    torch.manual_seed(1)
    config = GivaConfig(r=4, init_weights=False, variant=variant, bases_dtype="bfloat16",
                        target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(), config).eval()
    ids = text_batches(batch=3)[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "a")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    export_lora(loaded, tmp_path / "lora")
    lora = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


# ----------------------------------------------- seeded bases written after creation (fuzzing review, F1)


def _seeded_adapter(variant: str) -> PeftModel:
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 5)).eval()
    return get_peft_model(base, GivaConfig(r=2, target_modules=["0", "1"], variant=variant, init_weights=False)).eval()


def _fresh_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 5)).eval()


def _saved_keys(folder: Path) -> set[str]:
    return set(load_file(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("variant", "written"),
    [("Vr", "giva_B"), ("VrUrand", "giva_B"), ("random", "giva_A"), ("random", "giva_B")],
)
def test_a_seeded_basis_written_after_creation_is_saved_and_reloads_exactly(tmp_path, variant, written):
    """set_block_bases (or any write) over a basis that regenerates from (seed, layer name): the checkpoint keeps the
    written basis of that layer (only that one), and the reload gives the same outputs bit for bit."""
    model = _seeded_adapter(variant)
    model.save_pretrained(str(tmp_path / "first"))  # found unmodified here: the write below must still be seen
    layer = model.base_model.model[0]
    block = layer.blocks["default"][0]
    generator = torch.Generator().manual_seed(5)
    a, b = layer.giva_A["default"].clone(), layer.giva_B["default"].clone()
    if written == "giva_A":
        a = torch.linalg.qr(torch.randn(8, 2, generator=generator))[0].T.contiguous()
    else:
        b = torch.linalg.qr(torch.randn(6, 2, generator=generator))[0]
    layer.set_block_bases("default", block, a, b)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(str(tmp_path / "adapter"))
    keys = _saved_keys(tmp_path / "adapter")
    assert f"base_model.model.0.{written}" in keys
    assert not any(k.startswith("base_model.model.1.") and k.endswith(written) for k in keys)  # unmodified: omitted
    loaded = PeftModel.from_pretrained(_fresh_base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    twin = loaded.base_model.model[0]
    assert torch.equal(twin.giva_A["default"], layer.giva_A["default"])
    assert torch.equal(twin.giva_B["default"], layer.giva_B["default"])


@pytest.mark.parametrize("how", ["state dict", ".data"])
def test_a_seeded_basis_written_after_a_save_is_saved_and_reloads_exactly(tmp_path, how):
    """A state-dict load carrying a seeded basis, or a write through ``.data`` (which leaves the version counter as
    it was), after a first save: the next save must keep the new bytes (it once omitted the basis, and the reload
    failed its checksum)."""
    model = _seeded_adapter("Vr")
    model.save_pretrained(str(tmp_path / "first"))
    written = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))[0].float()
    if how == "state dict":
        model.load_state_dict({"base_model.model.0.giva_B.default": written}, strict=False)
    else:
        layer = model.base_model.model[0]
        layer.giva_B["default"].data.copy_(written)
        layer._forget_cast_bases()  # as docs/adapter-math.md asks after a .data write
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert torch.equal(load_file(tmp_path / "adapter" / "adapter_model.safetensors")["base_model.model.0.giva_B"], written)
    loaded = PeftModel.from_pretrained(_fresh_base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


@pytest.mark.parametrize("variant", ["Vr", "random"])
def test_an_unmodified_or_rewritten_seeded_basis_is_still_omitted(tmp_path, variant):
    """Writing back the very seeded bases (as giva.initialize does with Vr's B) keeps the checkpoint as small."""
    model = _seeded_adapter(variant)
    model.save_pretrained(str(tmp_path / "before"))
    for module in (model.base_model.model[0], model.base_model.model[1]):
        for block in module.blocks["default"]:
            rows = slice(block.rank_offset, block.rank_offset + block.rank)
            outs = slice(block.row_offset, block.row_offset + block.out_size)
            a = module.giva_A["default"][rows].clone()
            b = module.giva_B["default"][outs, rows].clone()
            module.set_block_bases("default", block, a, b)
    model.save_pretrained(str(tmp_path / "after"))
    omitted = ("giva_A", "giva_B") if variant == "random" else ("giva_B",)
    for folder in ("before", "after"):
        assert not any(k.endswith(omitted) for k in _saved_keys(tmp_path / folder))
    assert _saved_keys(tmp_path / "before") == _saved_keys(tmp_path / "after")
    sizes = {f: (tmp_path / f / "adapter_model.safetensors").stat().st_size for f in ("before", "after")}
    assert sizes["before"] == sizes["after"]


def test_a_checkpoint_of_an_older_giva_that_lost_a_written_basis_names_that_cause(tmp_path):
    """Older givas omitted a written seeded basis and recorded its checksum: the load error says so."""
    model = _seeded_adapter("Vr")
    layer = model.base_model.model[0]
    layer.set_block_bases(
        "default", layer.blocks["default"][0], layer.giva_A["default"].clone(), torch.linalg.qr(torch.randn(6, 2))[0]
    )
    model.save_pretrained(str(tmp_path / "adapter"))

    def as_older_giva_saved_it(state):  # the written B dropped, the CRC32 of its bytes recorded
        written = state.pop("base_model.model.0.giva_B")
        state["base_model.model.0.giva_seeded_crc32"] = torch.tensor(zlib.crc32(written.numpy().tobytes()))

    folder = _edited(tmp_path / "adapter", tmp_path, tensors=as_older_giva_saved_it)
    with pytest.raises(ValueError, match=r"regenerate differently.*saved by an older giva from an adapter whose seeded basis was modified after creation"):
        PeftModel.from_pretrained(_fresh_base(), str(folder))


def test_a_save_over_a_folder_named_like_a_file_it_writes_raises_and_keeps_the_folder(tmp_path):
    """PEFT's save fails writing ``adapter_config.json`` where a folder has that name; the atomic swap would
    instead drop the folder with what it holds. It raises before the swap and the target stays as it was."""
    model = get_peft_model(tiny_bert(), GivaConfig(r=2, variant="random"))
    in_the_way = tmp_path / "out" / "adapter_config.json"
    in_the_way.mkdir(parents=True)
    (in_the_way / "notes.txt").write_text("mine")
    with pytest.raises(IsADirectoryError, match="adapter_config.json there is a folder, where the save writes a file"):
        model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["adapter_config.json", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    model.save_pretrained(tmp_path / "elsewhere")
    assert torch.equal(load(tmp_path / "elsewhere"), logits(model.eval()))


# ------------------------------------------------- a model wrapped by activation checkpointing (or FSDP1)


@pytest.mark.skipif(
    Version(peft.__version__) < Version("0.22"),
    reason="PEFT < 0.22 itself drops the tensors of wrapped layers from the save, for every method (PEFT #3876)",
)
@pytest.mark.parametrize("variant", ["random", "VrUr", "weight"])
def test_a_save_of_an_activation_checkpointed_model_is_the_unwrapped_save(tmp_path, variant):
    """torch's ``checkpoint_wrapper`` (accelerate's FSDP activation checkpointing) adds ``_checkpoint_wrapped_module``
    to ``named_modules()`` names but not to ``state_dict()`` keys: the extra keys GiVA writes (seeded-basis checksums,
    the bases of a deferred ``weight`` SVD) must carry the keys' names, or the save holds a checksum for a layer no
    model has and a reload cannot check what it regenerates."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.bert.modeling_bert import BertLayer

    def wrapped_and_plain() -> tuple[torch.nn.Module, torch.nn.Module]:
        models = []
        for _ in range(2):
            model = get_peft_model(tiny_bert(), GivaConfig(r=2, variant=variant, init_weights=False)).eval()
            torch.manual_seed(1)
            for name, param in model.named_parameters():
                if "giva_lambda" in name:
                    param.data.normal_()
            models.append(model)
        return models[0], models[1]

    wrapped, plain = wrapped_and_plain()
    apply_activation_checkpointing(wrapped, check_fn=lambda module: isinstance(module, BertLayer))
    assert any("_checkpoint_wrapped_module" in name for name, _ in wrapped.named_modules())
    wrapped.save_pretrained(tmp_path / "wrapped")
    plain.save_pretrained(tmp_path / "plain")
    saved = load_file(tmp_path / "wrapped" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(expected)
    for key in expected:
        assert torch.equal(saved[key], expected[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "records no checksum of its seeded bases" warning
        assert torch.equal(load(tmp_path / "wrapped"), logits(plain))
