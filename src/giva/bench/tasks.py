"""Task data for `giva bench`: a fixed split, one tokeniser, and the loaders every method shares."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from ..assets import resolve_model
from ..data import TextDataset, deduplicate, load_text_classification, split_dataset
from ..finetune import ensure_pad_token, make_loader
from .spec import TaskSpec

EVAL_BATCH_SIZE = 64
CLM_ANSWER_ROOM = 4  # tokens kept free after a causal-LM prompt for ' positive' / ' negative' + eos


@dataclass
class TaskData:
    """The fixed (train, validation, test) split of a task and its tokeniser."""

    spec: TaskSpec
    model_path: str
    tokenizer: Any
    train: TextDataset
    val: TextDataset
    test: TextDataset
    _eval_loaders: dict[str, DataLoader] = field(default_factory=dict, repr=False)

    @property
    def num_labels(self) -> int:
        return self.train.num_labels

    def train_loader(self, seed: int) -> DataLoader:
        """A fresh shuffled loader: the order depends on the seed only, never on what iterated it before."""
        if self.spec.kind == "clm":
            return clm_loader(self.tokenizer, self.train, self.spec, shuffle=True, seed=seed)
        return make_loader(self.tokenizer, self.train, self.spec.batch_size, self.spec.max_length, True, seed)

    def eval_loader(self, part: str) -> DataLoader:
        """The unshuffled loader of 'val' or 'test', tokenised once per task."""
        if part not in self._eval_loaders:
            data = {"val": self.val, "test": self.test}[part]
            self._eval_loaders[part] = make_loader(self.tokenizer, data, EVAL_BATCH_SIZE, self.spec.max_length, False)
        return self._eval_loaders[part]

    def part(self, part: str) -> TextDataset:
        return {"val": self.val, "test": self.test}[part]

    def predict(self, model: nn.Module, part: str) -> list[int]:
        """The predicted label index of every example of ``part`` ('val' or 'test'), in order: argmax of
        the classifier, or, for a causal-LM task, the label whose word was generated (-1: no label word)."""
        if self.spec.kind == "clm":
            return generated_labels(model, self.tokenizer, self.part(part), self.spec)
        return classifier_predictions(model, self.eval_loader(part))

    def evaluate(self, model: nn.Module, part: str) -> float:
        """Accuracy on ``part``: argmax of the classifier, or exact match of the generated label word."""
        return accuracy(self.predict(model, part), self.part(part).labels)

    def fingerprint(self, part: str) -> str:
        """sha256 of the texts and labels of ``part``: paired comparisons check they share the examples."""
        data = self.part(part)
        digest = hashlib.sha256()
        for text, label in zip(data.texts, data.labels):
            digest.update(f"{label}\t{text}\n".encode())
        return digest.hexdigest()


def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


@torch.no_grad()
def classifier_predictions(model: nn.Module, loader: DataLoader) -> list[int]:
    """``argmax(logits)`` per example, in loader order (the model's train/eval flag is restored)."""
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    try:
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            predictions += logits.argmax(-1).tolist()
    finally:
        model.train(was_training)
    return predictions


def load_task(spec: TaskSpec) -> TaskData:
    dataset = load_text_classification(spec.data)
    if spec.dedupe:
        dataset = deduplicate(dataset)
    train, val, test = split_dataset(dataset, test_size=spec.test_size, val_size=spec.val_size, seed=spec.split_seed)
    if spec.max_train_samples is not None:
        train = train.subset(list(range(min(spec.max_train_samples, len(train)))))
    if spec.kind == "clm" and len(spec.label_words) != dataset.num_labels:
        raise ValueError(
            f"task {spec.name!r}: label_words {list(spec.label_words)!r} has {len(spec.label_words)} words, but "
            f"data {spec.data!r} has {dataset.num_labels} labels {dataset.label_names!r} (one word per label, in that order)"
        )
    path = resolve_model(spec.model)
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(path), where=path)
    return TaskData(spec, path, tokenizer, train, val, test)


def encode_prompts(tokenizer: Any, texts: list[str], spec: TaskSpec) -> list[list[int]]:
    """Token ids of ``spec.prompt`` per text; a long text loses its START, so the prompt's cue
    (e.g. 'Sentiment:') always survives truncation. Room is left for the answer tokens."""
    prompts = [spec.prompt.format(text=text) for text in texts]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(prompts, truncation=True, max_length=spec.max_length - CLM_ANSWER_ROOM)["input_ids"]
    finally:
        tokenizer.truncation_side = side


def clm_loader(tokenizer: Any, data: TextDataset, spec: TaskSpec, shuffle: bool, seed: int = 0) -> DataLoader:
    """Instruction -> label as causal-LM text (``prompt + ' ' + label + eos``); the loss covers the answer only."""
    rows = []
    for prompt_ids, label in zip(encode_prompts(tokenizer, data.texts, spec), data.labels):
        answer_ids = tokenizer(" " + spec.label_words[label], add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + [tokenizer.eos_token_id]
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


def exact_match(model: nn.Module, tokenizer: Any, data: TextDataset, spec: TaskSpec, batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Share of examples whose greedy continuation of the prompt, stripped, equals the label word."""
    return accuracy(generated_labels(model, tokenizer, data, spec, batch_size), data.labels)


@torch.no_grad()
def generated_labels(model: nn.Module, tokenizer: Any, data: TextDataset, spec: TaskSpec, batch_size: int = EVAL_BATCH_SIZE) -> list[int]:
    """The label whose word the greedy continuation of each prompt is, stripped; -1 when it is no label word.

    Prompts are left-padded; generation stops after the longest answer plus one token (the eos a
    trained model emits), so an answer followed by anything but whitespace does not match.
    """
    by_word = {word: label for label, word in enumerate(spec.label_words)}
    max_new = max(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in spec.label_words) + 1
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    try:
        prompt_ids = encode_prompts(tokenizer, data.texts, spec)
        for start in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, ids in enumerate(batch):  # left padding: the next token follows the prompt directly
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                attention[i, width - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            predictions += [by_word.get(t.strip(), -1) for t in texts]
    finally:
        model.train(was_training)
    return predictions
