"""A few checks on the real all-MiniLM-L6-v2 with real Pang & Lee sentences (installed by `make setup`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import giva
from giva import GivaConfig
from giva.assets import minilm_path
from giva.data import load_bundled, split_dataset
from giva.finetune import make_loader
from giva.init import giva_layers

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def setup():
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, _, _ = split_dataset(load_bundled("pang-lee"), test_size=1000, seed=0)
    loader = make_loader(tokenizer, train.subset(list(range(64))), batch_size=16, max_length=48, shuffle=False)
    return path, list(loader)


def _model(path: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def test_real_bases_are_orthonormal_and_fp32(setup):
    path, batches = setup
    model = get_peft_model(_model(path), GivaConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    report = giva.initialize(model, batches, num_batches=1, progress=False)
    assert report.layers == 12
    for name, layer in giva_layers(model).items():
        a, b = layer.giva_A["default"], layer.giva_B["default"]
        assert a.dtype == torch.float32 and a.shape == (8, 384), name
        torch.testing.assert_close(a @ a.mT, torch.eye(8), atol=1e-5, rtol=0)
        torch.testing.assert_close(b.mT @ b, torch.eye(8), atol=1e-5, rtol=0)


def test_real_training_steps_lower_the_loss_and_reload_is_identical(setup, tmp_path):
    path, batches = setup
    model = get_peft_model(_model(path), GivaConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    giva.initialize(model, batches, progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)

    def mean_loss() -> float:
        model.eval()
        with torch.no_grad():
            value = sum(model(**b).loss.item() for b in batches) / len(batches)
        model.train()
        return value

    before = mean_loss()
    for step in range(12):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = mean_loss()
    assert after < before - 0.02, (before, after)

    model.eval()
    with torch.no_grad():
        expected = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_model(path, seed=123), tmp_path).eval()  # other head init: must be overwritten
    with torch.no_grad():
        logits = loaded(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
    assert torch.equal(logits, expected)


def test_giva_finetune_cli_end_to_end(tmp_path):
    out = tmp_path / "adapter"
    cmd = [
        sys.executable, "-m", "giva.cli", "finetune", "--max-train-samples", "96", "--val-size", "64",
        "--epochs", "1", "--batch-size", "16", "--output-dir", str(out), "--no-progress",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for field in ("accuracy", "trainable params", "adapter size", "init time", "train time"):
        assert field in result.stdout
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert GivaConfig.from_pretrained(out).bases_info["source"] == "gradient"
