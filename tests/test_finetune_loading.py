"""How `giva finetune` loads its classifier: a fresh head is expected and not reported (transformers lists it as
MISSING on every run), a weight missing outside the head is a warning that names it."""

from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file, save_file

from giva.finetune import load_classifier
from tiny_models import tiny_bert


@pytest.fixture
def bare_body(tmp_path):
    """A tiny BERT checkpoint without a classifier head, as a base model is published."""
    folder = tmp_path / "body"
    tiny_bert().save_pretrained(folder)
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith("classifier.")}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_fresh_head_loads_without_a_report(bare_body, capfd, caplog):
    with caplog.at_level(logging.INFO):
        model = load_classifier(str(bare_body), num_labels=3)
    assert model.classifier.out_features == 3
    out, err = capfd.readouterr()
    # transformers 5 prints a LOAD REPORT listing classifier.weight as MISSING, 4.x "Some weights ... newly initialized"
    assert "classifier" not in out + err + caplog.text, out + err + caplog.text


def test_a_weight_missing_outside_the_head_is_named(bare_body, caplog):
    weights = load_file(bare_body / "model.safetensors")
    gone = "bert.encoder.layer.0.output.dense.bias"
    weights.pop(gone)
    save_file(weights, bare_body / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="giva.finetune"):
        load_classifier(str(bare_body), num_labels=2)
    warned = [r.getMessage() for r in caplog.records if r.name == "giva.finetune"]
    assert len(warned) == 1 and gone in warned[0] and "1 weight(s) outside the classifier head" in warned[0], warned
