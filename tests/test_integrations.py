"""GiVA inside the loops people use: transformers Trainer, TRL SFTTrainer, Accelerate."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import giva
from giva import GivaConfig
from tiny_models import VOCAB, tiny_bert, tiny_llama


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = [
            {"input_ids": torch.randint(0, VOCAB, (10,), generator=g), "labels": torch.randint(0, 2, (), generator=g)}
            for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class _StepProbe(TrainerCallback):
    """Records, at the first step, whether the bases were already there and what the LR was."""

    def __init__(self) -> None:
        self.initialized_at_first_step = None
        self.first_lr = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.initialized_at_first_step is None:
            self.initialized_at_first_step = giva.bases_initialized(model)
            self.first_lr = optimizer.param_groups[0]["lr"]


def _args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2, warmup_steps=2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def test_trainer_callback_initialises_before_the_first_step(tmp_path):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    callback, probe = giva.GivaInitCallback(num_batches=2, progress=False), _StepProbe()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_ListDataset(), callbacks=[callback, probe])
    trainer.train()
    assert probe.initialized_at_first_step is True
    assert probe.first_lr == pytest.approx(0.0)  # warmup starts at 0: the schedule was not shifted
    assert callback.report.num_batches == 2 and trainer.state.global_step == 6
    lambda_o = model.base_model.model.bert.encoder.layer[0].attention.self.query.giva_lambda_o["default"]
    assert lambda_o.abs().sum() > 0  # it trained


def test_trainer_callback_with_num_batches_all_reads_every_batch_of_the_trainers_loader(tmp_path):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    callback = giva.GivaInitCallback(num_batches="all", progress=False)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_ListDataset(n=40), callbacks=[callback])
    trainer.train()
    assert callback.report.num_batches == 5  # 40 rows, batches of 8


def test_trainer_callback_refuses_a_bad_num_batches_when_built():
    with pytest.raises(ValueError, match=r"num_batches must be a positive int .* or 'all'"):
        giva.GivaInitCallback(num_batches=0)
    with pytest.raises(ValueError, match=r"statistic must be one of \('mean', 'second-moment'\), got 'moment'"):
        giva.GivaInitCallback(statistic="moment")
    with pytest.raises(ValueError, match="mode must be 'auto', 'sketch' or 'exact', got 'fast'"):
        giva.GivaInitCallback(mode="fast")
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        giva.GivaInitCallback(loss_fn="cross_entropy")


def test_trainer_callback_passes_the_statistic_to_initialize(tmp_path):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    callback = giva.GivaInitCallback(num_batches=3, progress=False, statistic="second-moment")
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_ListDataset(n=24), callbacks=[callback])
    trainer.train()
    assert model.peft_config["default"].bases_info["statistic"] == "second-moment"


def test_trainer_callback_leaves_already_initialised_bases_alone(tmp_path, batches):
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    giva.initialize(model, batches[1:], num_batches=2, progress=False)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    before = layer.giva_A["default"].clone()
    callback = giva.GivaInitCallback(progress=False)
    Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_ListDataset(), callbacks=[callback]).train()
    assert callback.report is None and torch.equal(layer.giva_A["default"], before)


def test_trainer_resume_from_checkpoint_loads_the_bases_and_continues_bit_identically(tmp_path):
    """The Trainer's checkpoint holds the bases (buffers) with the vectors; on resume the callback leaves them be."""
    def run(out, resume=None):
        torch.manual_seed(0)
        model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
        callback = giva.GivaInitCallback(num_batches=2, progress=False)
        args = _args(out, max_steps=8, save_strategy="steps", save_steps=4)
        Trainer(model=model, args=args, train_dataset=_ListDataset(n=64), callbacks=[callback]).train(resume_from_checkpoint=resume)
        return callback, {k: v.detach().clone() for k, v in model.state_dict().items() if "giva_" in k}

    _, whole = run(tmp_path / "whole")
    callback, resumed = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-4"))
    assert callback.report is None  # the bases came from the checkpoint, not from a new gradient
    assert whole.keys() == resumed.keys() and any("giva_A" in k for k in whole)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_upcast_vectors_touches_only_the_half_precision_vectors_of_a_quantised_model():
    from giva.integrations.trainer import upcast_vectors

    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model.to(torch.bfloat16)
    vectors = [p for n, p in model.named_parameters() if "giva_lambda" in n]
    assert upcast_vectors(model) == 0 and {p.dtype for p in vectors} == {torch.bfloat16}  # a user's own cast stays
    model.base_model.model.is_loaded_in_4bit = True  # as transformers marks a bitsandbytes model (TRL's test)
    assert upcast_vectors(model) == len(vectors) == 8 and {p.dtype for p in vectors} == {torch.float32}
    others = {p.dtype for n, p in model.named_parameters() if "giva_" not in n}
    assert others == {torch.bfloat16}  # the head and the frozen weights are not the callback's business
    assert upcast_vectors(model) == 0


def test_the_callback_leaves_the_vectors_dtype_to_fsdp_and_deepspeed(monkeypatch):
    """Their flat parameters need one dtype (TRL's bf16 cast gives it); set in the arguments or by the launcher."""
    from types import SimpleNamespace

    def vectors_after_init_end(**args) -> set:
        model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
        model.to(torch.bfloat16)
        model.base_model.model.is_loaded_in_4bit = True
        giva.GivaInitCallback().on_init_end(SimpleNamespace(**args), None, None, model=model)
        return {p.dtype for n, p in model.named_parameters() if "giva_lambda" in n}

    assert vectors_after_init_end(fsdp="", deepspeed=None) == {torch.float32}
    assert vectors_after_init_end(fsdp="full_shard", deepspeed=None) == {torch.bfloat16}
    assert vectors_after_init_end(fsdp="", deepspeed="ds_config.json") == {torch.bfloat16}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp
    assert vectors_after_init_end(fsdp="", deepspeed=None) == {torch.bfloat16}


def test_trl_sft_trainer_takes_the_same_callback(tmp_path):
    pytest.importorskip("trl", reason="TRL (the sft extra) is not installed")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from giva.assets import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # any offline tokenizer will do
    tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(0)
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    data = Dataset.from_dict({"text": [f"review {i}: the film was {'good' if i % 2 else 'bad'}" for i in range(32)]})
    peft_model = get_peft_model(model, GivaConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    callback = giva.GivaInitCallback(progress=False)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2, report_to=[],
        save_strategy="no", use_cpu=True, max_length=32, disable_tqdm=True, logging_steps=1,
    )
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    assert callback.report is not None and giva.bases_initialized(peft_model)
    assert trainer.state.global_step == 4


def test_accelerate_loop_pattern(batches):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_peft_model(tiny_bert(), GivaConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loader = torch.utils.data.DataLoader(_ListDataset(), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    giva.initialize(accelerator.unwrap_model(model), loader, num_batches=1, progress=False)
    model.train()
    first_batch = next(iter(loader))
    losses = []
    for _ in range(8):
        loss = model(**first_batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
