"""Task data for `giva bench`: a fixed split, one tokeniser, and the loaders every method shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from ..assets import resolve_model
from ..data import TextDataset, load_text_classification, split_dataset
from ..finetune import make_loader
from .spec import TaskSpec

EVAL_BATCH_SIZE = 64


@dataclass
class TaskData:
    """The fixed (train, validation, test) split of a task and its tokeniser."""

    spec: TaskSpec
    model_path: str
    tokenizer: Any
    train: TextDataset
    val: TextDataset
    test: TextDataset

    @property
    def num_labels(self) -> int:
        return self.train.num_labels

    def train_loader(self, seed: int) -> DataLoader:
        """A fresh shuffled loader: the order depends on the seed only, never on what iterated it before."""
        if self.spec.kind == "clm":
            return clm_loader(self.tokenizer, self.train, self.spec, shuffle=True, seed=seed)
        return make_loader(self.tokenizer, self.train, self.spec.batch_size, self.spec.max_length, True, seed)

    def eval_loader(self, part: str) -> DataLoader:
        data = {"val": self.val, "test": self.test}[part]
        return make_loader(self.tokenizer, data, EVAL_BATCH_SIZE, self.spec.max_length, False)


def load_task(spec: TaskSpec) -> TaskData:
    dataset = load_text_classification(spec.data)
    train, val, test = split_dataset(dataset, test_size=spec.test_size, val_size=spec.val_size, seed=spec.split_seed)
    if spec.max_train_samples is not None:
        train = train.subset(list(range(min(spec.max_train_samples, len(train)))))
    path = resolve_model(spec.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TaskData(spec, path, tokenizer, train, val, test)


def clm_loader(tokenizer: Any, data: TextDataset, spec: TaskSpec, shuffle: bool, seed: int = 0) -> DataLoader:
    """Instruction -> label as causal-LM text (``prompt + ' ' + label``); the loss covers the label tokens only."""
    rows = []
    for text, label in zip(data.texts, data.labels):
        prompt = spec.prompt.format(text=text)
        answer = " " + ("positive" if data.label_names[label] in ("1", "positive") else "negative")
        prompt_ids = tokenizer(prompt, truncation=True, max_length=spec.max_length - 4)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + answer_ids, len(prompt_ids)))

    def collate(batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, (ids, n_prompt) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=spec.batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)
