"""GiVA with TRL's trainers other than SFT (DPO, reward, GRPO/RLOO) and TRL's SFT features that read the config.

TRL's DPO/KTO/GRPO/RLOO trainers, given a PeftModel with no ``ref_model``, add a ``"ref"`` adapter with the *same*
config object as ``"default"`` and copy the parameters whose names hold ``".default."`` into it: GiVA's vectors
(``...giva_lambda_o.default``) and its bases (buffers) are not among them, so GiVA makes that adapter the copy.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import giva
from giva import GivaConfig
from giva.init import GradientInitError, giva_layers
from tiny_models import TRANSFORMERS_4, VOCAB, text_batches, tiny_llama

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

WORDS = "review the film was good bad great awful . 0 1 2 3 4 5 6 7 8 9".split()
SPECIAL = ["<pad>", "<eos>", "<unk>"]
TEMPLATE = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + ' <|im_end|> ' }}{% endfor %}"
TARGETS = ["q_proj", "v_proj"]


def word_tokenizer(extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + list(extra))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def preference_data(n: int = 16):
    return datasets.Dataset.from_dict({
        "prompt": [f"review {i % 10} the film was" for i in range(n)],
        "chosen": [" good" if i % 2 else " bad" for i in range(n)],
        "rejected": [" bad" if i % 2 else " good" for i in range(n)],
    })


def dpo_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=0.0, report_to=[],
        save_strategy="no", use_cpu=True, max_length=32, disable_tqdm=True, logging_steps=1, seed=0,
    )
    return trl.DPOConfig(**{**defaults, **kwargs})


def trained_default(core: bool = False) -> PeftModel:
    """A pre-wrapped GiVA model whose "default" adapter is initialised and not an identity (a pretrained adapter)."""
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=TARGETS, task_type="CAUSAL_LM", core=core,
                                                    giva_dropout=0.1))
    giva.initialize(model, text_batches(n=1, labels="lm"), num_batches=1, progress=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "giva_" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return model


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def logits(model: PeftModel, adapter: str) -> torch.Tensor:
    ids = IDS
    active = model.active_adapter
    model.set_adapter(adapter)
    try:
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits
    finally:
        model.set_adapter(active)


def adapter_tensors(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in giva_layers(model).items():
        for attr in ("giva_A", "giva_B", "giva_lambda_s", "giva_lambda_o", "giva_core"):
            if adapter in getattr(layer, attr):
                out[f"{name}.{attr}"] = getattr(layer, attr)[adapter]
    return out


@pytest.mark.parametrize("core", [False, True])
def test_dpo_reference_adapter_of_a_pretrained_giva_adapter_is_the_initial_policy(tmp_path, core, caplog):
    model = trained_default(core=core)
    before = logits(model, "default")
    default_config = model.peft_config["default"]
    with caplog.at_level(logging.INFO, logger="giva"):
        trainer = trl.DPOTrainer(model=model, args=dpo_args(tmp_path), train_dataset=preference_data(),
                                 processing_class=word_tokenizer())
    assert model.peft_config["ref"] is default_config  # TRL's pattern
    assert any("'ref'" in r.getMessage() and "copy" in r.getMessage() for r in caplog.records)
    ref, default = adapter_tensors(model, "ref"), adapter_tensors(model, "default")
    assert ref.keys() == default.keys() and len(ref) == len(giva_layers(model)) * (5 if core else 4)
    for key, tensor in default.items():
        assert torch.equal(ref[key], tensor), key
        if ".giva_lambda" in key or ".giva_core" in key:  # trained: a copy, not the same storage
            assert ref[key] is not tensor and ref[key].data_ptr() != tensor.data_ptr(), key
        else:  # the frozen bases: shared until either is written (test_reference_adapter_shares_...)
            assert ref[key] is tensor, key
    for layer in giva_layers(model).values():
        assert layer.giva_compute_dtype["ref"] == layer.giva_compute_dtype["default"]
        assert layer.blocks["ref"] == layer.blocks["default"] and layer.r["ref"] == layer.r["default"]
        assert type(layer.giva_dropout["ref"]) is type(layer.giva_dropout["default"])
        assert layer.giva_dropout["ref"].p == layer.giva_dropout["default"].p
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".ref"))  # frozen
    assert any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".default"))
    assert giva.bases_initialized(model, "ref")
    assert torch.equal(logits(model, "ref"), before)

    trainer.train()
    first = next(h for h in trainer.state.log_history if "loss" in h)
    # transformers 4.x's Trainer logs the loss rounded to 4 decimals
    assert first["loss"] == pytest.approx(math.log(2), abs=5e-5 if TRANSFORMERS_4 else 1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_dpo_callback_does_not_calibrate_the_reference_of_a_fresh_adapter(tmp_path):
    """A fresh pre-wrapped adapter: the reference is the base model (its copy is an identity); the callback
    initialises "default" only, and its bases_info does not land on the reference's config (s9)."""
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=TARGETS, task_type="CAUSAL_LM"))

    def nll(m, batch):
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss

    callback = giva.GivaInitCallback(num_batches=2, progress=False, loss_fn=nll)
    calls = []
    real = giva.integrations.trainer.initialize

    def counting(*args, **kwargs):
        calls.append(kwargs.get("adapter_name"))
        return real(*args, **kwargs)

    giva.integrations.trainer.initialize = counting
    try:
        trainer = trl.DPOTrainer(model=model, args=dpo_args(tmp_path, learning_rate=1e-2), train_dataset=preference_data(),
                                 processing_class=word_tokenizer(), callbacks=[callback])
        trainer.train()
    finally:
        giva.integrations.trainer.initialize = real
    assert calls == ["default"]
    assert giva.bases_initialized(model, "default") and not giva.bases_initialized(model, "ref")
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith("giva_lambda_o.ref"))
    assert model.peft_config["default"].bases_info["num_batches"] == 2
    assert model.peft_config["ref"].bases_info is None
    with torch.no_grad(), model.disable_adapter():
        base = model.eval()(input_ids=IDS).logits
    assert torch.equal(logits(model, "ref"), base)


def test_dpo_callback_leaves_an_initialised_adapter_and_its_reference_alone(tmp_path):
    model = trained_default()
    info = copy.deepcopy(model.peft_config["default"].bases_info)
    callback = giva.GivaInitCallback(num_batches=3, progress=False,
                                     loss_fn=lambda m, b: m(input_ids=b["input_ids"], labels=b["input_ids"]).loss)
    trainer = trl.DPOTrainer(model=model, args=dpo_args(tmp_path), train_dataset=preference_data(),
                             processing_class=word_tokenizer(), callbacks=[callback])
    trainer.train()
    assert callback.report is None
    assert model.peft_config["default"].bases_info == info and info["num_batches"] == 1


def test_an_adapter_added_with_a_shared_config_under_another_name_is_fresh():
    model = trained_default()
    model.add_adapter("t2", model.peft_config["default"])
    for name, tensor in adapter_tensors(model, "t2").items():
        if "lambda_o" in name or "giva_A" in name:
            assert not tensor.any(), name
    assert not giva.bases_initialized(model, "t2")


def test_ref_is_mirrored_only_when_it_shares_default_s_config_object():
    model = trained_default()
    model.add_adapter("ref", copy.deepcopy(model.peft_config["default"]))
    assert not giva.bases_initialized(model, "ref")


def test_reference_adapter_shares_the_bases_until_either_is_written():
    """The mirror holds default's basis tensors (no second copy; a mixed batch of both keeps the shared-B path), and
    a write into either (set_block_bases, a state-dict load) gives the written one its own copy: the other keeps its
    values. Its vectors are copies: training default leaves them alone."""
    model = trained_default()
    model.add_adapter("ref", model.peft_config["default"])  # TRL's pattern
    layers = list(giva_layers(model).values())
    for layer in layers:
        for name in ("giva_A", "giva_B"):
            assert getattr(layer, name)["ref"] is getattr(layer, name)["default"], name
            assert getattr(layer, name).is_shared("ref")
        assert layer.giva_lambda_o["ref"].data_ptr() != layer.giva_lambda_o["default"].data_ptr()
    first = layers[0]
    with torch.no_grad():
        stacked = giva.serving._build_stacked(first, ("default", "ref"), torch.device("cpu"), torch.float32)
    assert stacked.shared_b is not None  # one B GEMM for the batch of both
    names = ["default", "ref"]
    expected = torch.cat([logits(model, "default")[:1], logits(model, "ref")[1:]])
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=IDS, adapter_names=names).logits, expected, atol=1e-5)

    # set_block_bases into the reference: default keeps its values and tensor.
    a_default, b_default = first.giva_A["default"].clone(), first.giva_B["default"].clone()
    block = first.blocks["ref"][0]
    a_new = torch.linalg.qr(torch.randn(first.in_features, block.rank))[0].T.contiguous()
    first.set_block_bases("ref", block, a_new, first.giva_B["ref"][:, : block.rank].clone())
    assert torch.equal(first.giva_A["ref"][: block.rank], a_new)
    assert torch.equal(first.giva_A["default"], a_default) and torch.equal(first.giva_B["default"], b_default)
    assert first.giva_A["ref"] is not first.giva_A["default"]
    assert first.giva_B["ref"] is first.giva_B["default"]  # B written with its own values: still shared

    # A state-dict load into the reference (another layer): default keeps its values.
    second = layers[1]
    a_default = second.giva_A["default"].clone()
    key = next(k for k in model.state_dict() if k.endswith(".giva_A.ref") and "layers.0.self_attn.v_proj" in k)
    assert second.giva_A["ref"] is second.giva_A["default"]
    model.load_state_dict({key: torch.randn_like(a_default)}, strict=False)
    assert torch.equal(second.giva_A["default"], a_default) and not torch.equal(second.giva_A["ref"], a_default)

    # Re-initialising default (giva.initialize writes through set_block_bases): the reference keeps the old bases.
    a_ref = layers[2].giva_A["ref"].clone()
    giva.initialize(model, text_batches(n=2, labels="lm", seed=5), num_batches=2, adapter_name="default", progress=False,
                    force=True)
    assert not torch.equal(layers[2].giva_A["default"], a_ref) and torch.equal(layers[2].giva_A["ref"], a_ref)


def test_initialize_keeps_bases_info_per_adapter_when_adapters_share_a_config():
    model = trained_default()
    info = copy.deepcopy(model.peft_config["default"].bases_info)
    model.add_adapter("t2", model.peft_config["default"])
    giva.initialize(model, text_batches(n=3, labels="lm"), num_batches=3, adapter_name="t2", progress=False)
    assert model.peft_config["default"].bases_info == info
    assert model.peft_config["t2"].bases_info["num_batches"] == 3
    assert model.peft_config["t2"] is not model.peft_config["default"]


def test_a_no_grad_forward_in_the_loss_fn_does_not_stop_calibration():
    """A teacher/reference forward under torch.no_grad() inside loss_fn (s11): it contributes no gradient, and the
    bases are those of the loss without it."""
    data = text_batches(n=2, labels="lm")

    def with_teacher(m, batch):
        with torch.no_grad():
            teacher = m(input_ids=batch["input_ids"]).logits
        return m(**batch).loss + 0.0 * teacher.sum()

    plain = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=TARGETS))
    giva.initialize(plain, data, num_batches=2, progress=False)
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=TARGETS))
    giva.initialize(model, data, num_batches=2, loss_fn=with_teacher, progress=False)
    for name, layer in giva_layers(model).items():
        assert torch.equal(layer.giva_A["default"], giva_layers(plain)[name].giva_A["default"])


def test_a_loss_fn_that_disables_adapters_itself_leaves_the_vectors_trainable():
    """TRL's DPO loss runs its reference under PeftModel.disable_adapter(): entered while calibration has the adapters
    off, PEFT freezes every adapter tensor and does not unfreeze it on exit (s11: the first step then had no grad)."""
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=TARGETS))

    def with_reference(m, batch):
        with torch.no_grad(), m.disable_adapter():
            reference = m(input_ids=batch["input_ids"]).logits
        return m(**batch).loss + 0.0 * reference.sum()

    giva.initialize(model, text_batches(n=1, labels="lm"), num_batches=1, loss_fn=with_reference, progress=False)
    vectors = [p for n, p in model.named_parameters() if "giva_lambda" in n]
    assert vectors and all(p.requires_grad for p in vectors)


def test_default_loss_takes_trl_completion_mask_batches_as_labels():
    """TRL's preference batches: input_ids, attention_mask, completion_mask and no labels."""
    data = text_batches(n=2, labels="lm")
    masks = [(torch.arange(b["input_ids"].shape[1]) >= 4).long().expand_as(b["input_ids"]) for b in data]
    trl_batches = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"]), "completion_mask": m}
                   for b, m in zip(data, masks)]
    labelled = [{"input_ids": b["input_ids"], "labels": b["input_ids"].masked_fill(m == 0, -100)} for b, m in zip(data, masks)]
    reference = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=TARGETS))
    giva.initialize(reference, labelled, num_batches=2, progress=False)
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=TARGETS))
    giva.initialize(model, trl_batches, num_batches=2, progress=False)
    for name, layer in giva_layers(model).items():
        torch.testing.assert_close(layer.giva_A["default"], giva_layers(reference)[name].giva_A["default"])


def test_default_loss_leaves_out_kto_keys_for_a_model_without_kwargs():
    """TRL's KTO batches also carry ``label``, ``ref_*`` and ``KL_*`` entries, which are not model inputs: the default
    loss leaves them out, so a model whose forward takes no **kwargs runs on them."""
    data = text_batches(n=1, labels="lm")[0]
    ids = data["input_ids"]
    mask = (torch.arange(ids.shape[1]) >= 4).long().expand_as(ids)
    kto = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
           "KL_input_ids": ids.flip(0), "KL_attention_mask": torch.ones_like(ids), "KL_completion_mask": mask,
           "label": torch.tensor([True, False] * (ids.shape[0] // 2)), "ref_logps": torch.zeros(ids.shape[0]),
           "ref_KL_logps": torch.zeros(ids.shape[0])}
    base = tiny_llama()
    forward = base.forward

    def strict_forward(input_ids=None, attention_mask=None, labels=None):
        return forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    base.forward = strict_forward
    model = get_peft_model(base, GivaConfig(r=2, target_modules=TARGETS))
    giva.initialize(model, [kto], num_batches=1, progress=False)
    reference = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=TARGETS))
    giva.initialize(reference, [{"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100)}], num_batches=1, progress=False)
    for name, layer in giva_layers(model).items():
        torch.testing.assert_close(layer.giva_A["default"], giva_layers(reference)[name].giva_A["default"])


@pytest.mark.parametrize("loss_fn", [None, lambda m, batch: m(**batch).loss], ids=["default-loss", "own-loss"])
def test_the_calibration_forward_builds_no_kv_cache(loss_fn):
    """A decoder whose config turns the cache on builds none while it calibrates, whatever the loss function (a
    calibration never reads a KV cache), and has the cache on again afterwards."""
    base = tiny_llama()
    assert base.config.use_cache
    caches = []
    forward = base.forward

    def spy(*args, **kwargs):
        output = forward(*args, **kwargs)
        caches.append(output.past_key_values)
        return output

    base.forward = spy
    model = get_peft_model(base, GivaConfig(r=2, target_modules=TARGETS))
    giva.initialize(model, text_batches(n=1, labels="lm"), num_batches=1, loss_fn=loss_fn, progress=False)
    assert caches == [None] and base.config.use_cache
    with torch.no_grad():  # the check above can fail: the same forward outside the calibration builds one
        model(**text_batches(n=1, labels="lm")[0])
    assert caches[-1] is not None


@pytest.mark.parametrize("module, loss_fn", [("q_proj", None), ("down_proj", lambda m, batch: m(**batch).loss)],
                         ids=["q_proj-default-loss", "down_proj-own-loss"])
def test_padding_free_packed_rows_calibrate_as_the_same_rows_padded(module, loss_fn):
    """TRL's padding-free batches (--packing): the rows of a micro-batch end to end in one row of tokens, told apart by
    position_ids starting again at 0, no attention mask. transformers masks attention between the rows only without a
    KV cache; the calibration forward built one (config.use_cache: transformers 5's Trainer turns it off, 4.x's and
    a loop of one's own do not), the tokens attended across rows, and the bases were up to 0.79 off those of the
    same rows padded (4.56.2 and 5.25; 1.5e-6 now). A loss function of one's own is covered alike."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (5, 9, 7)]
    width = max(map(len, rows))
    padded = {"input_ids": torch.stack([torch.cat([r, r.new_zeros(width - len(r))]) for r in rows]),
              "attention_mask": torch.stack([torch.arange(width) < len(r) for r in rows]).long()}
    padded["labels"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, -100)
    labels = torch.cat([r.clone() for r in rows])
    positions = torch.cat([torch.arange(len(r)) for r in rows])
    labels[positions == 0] = -100  # as TRL's collator: no row's first token is scored as the previous row's next
    packed = {"input_ids": torch.cat(rows)[None], "position_ids": positions[None], "labels": labels[None]}
    bases = []
    for batch in (padded, packed):
        model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=[module]))
        giva.initialize(model, [batch], num_batches=1, loss_fn=loss_fn, progress=False)
        bases.append({name: layer.giva_A["default"] for name, layer in giva_layers(model).items()})
    for name in bases[0]:
        torch.testing.assert_close(bases[1][name], bases[0][name], rtol=0, atol=1e-5, msg=name)


def test_batches_of_raw_rows_ask_for_a_loss_fn():
    model = get_peft_model(tiny_llama(), GivaConfig(r=2, target_modules=TARGETS))
    rows = [[{"prompt": "review 1 the film was"}, {"prompt": "review 2 the film was"}]]
    with pytest.raises(GradientInitError, match=r"raw rows.*loss_fn.*tokeni"):
        giva.initialize(model, rows, num_batches=1, progress=False)


def test_dpo_trainer_with_the_callback_and_no_loss_fn(tmp_path):
    callback = giva.GivaInitCallback(num_batches=1, progress=False)
    trainer = trl.DPOTrainer(model=tiny_llama(), args=dpo_args(tmp_path, learning_rate=1e-2, max_steps=2),
                             train_dataset=preference_data(), processing_class=word_tokenizer(),
                             peft_config=GivaConfig(r=2, target_modules=TARGETS, task_type="CAUSAL_LM"), callbacks=[callback])
    trainer.train()
    assert callback.report is not None and giva.bases_initialized(trainer.model)
    assert trainer.state.global_step == 2


def test_trainable_token_indices_train_save_and_reload(tmp_path):
    config = GivaConfig(r=2, target_modules=TARGETS, task_type="CAUSAL_LM", trainable_token_indices=[3, 5])
    model = get_peft_model(tiny_llama(), config)
    giva.initialize(model, text_batches(n=1, labels="lm"), num_batches=1, progress=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n in trainable)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    ids = torch.tensor([[1, 3, 5, 7, 9]])
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert reloaded.peft_config["default"].trainable_token_indices == [3, 5]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_sft_with_a_chat_template_path_that_adds_tokens(tmp_path):
    """SFTConfig(chat_template_path=...) clones a template whose special tokens the tokenizer lacks: TRL sets
    trainable_token_indices and modules_to_save=['lm_head'] on the GivaConfig; the adapter trains, saves, reloads."""
    source = word_tokenizer(extra=("<|im_start|>", "<|im_end|>"))
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    source.eos_token = "<|im_end|>"
    source.chat_template = TEMPLATE
    source.save_pretrained(tmp_path / "template")
    data = datasets.Dataset.from_dict({"messages": [
        [{"role": "user", "content": f"review {i % 10}"}, {"role": "assistant", "content": "good" if i % 2 else "bad"}]
        for i in range(8)
    ]})
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, max_length=32, disable_tqdm=True, seed=0,
        chat_template_path=str(tmp_path / "template"),
    )
    trainer = trl.SFTTrainer(model=tiny_llama(), args=args, train_dataset=data, processing_class=word_tokenizer(),
                             peft_config=GivaConfig(r=2, target_modules=TARGETS, task_type="CAUSAL_LM"),
                             callbacks=[giva.GivaInitCallback(num_batches=1, progress=False)])
    trainer.train()
    config = trainer.model.peft_config["default"]
    assert config.trainable_token_indices and config.modules_to_save == ["lm_head"]
    trainer.save_model(str(tmp_path / "final"))
    fresh = tiny_llama()
    fresh.resize_token_embeddings(trainer.model.get_input_embeddings().weight.shape[0])
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "final"))
    # Every tensor of the trained model is back (GiVA's, the trainable tokens' rows, lm_head). The logits are not
    # compared: after SFTTrainer a reload differs by ~1e-3 with PEFT LoRA too (the trainer leaves the base model
    # computing differently), which test_trainable_token_indices_train_save_and_reload covers without TRL.
    trained, loaded = trainer.model.state_dict(), reloaded.state_dict()
    assert trained.keys() == loaded.keys()
    assert any("trainable_tokens_delta" in key for key in trained)
    assert all(torch.equal(trained[key], loaded[key]) for key in trained)
