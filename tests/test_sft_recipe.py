"""`giva sft --config FILE`: a YAML/JSON recipe of flags, overridden by the command line; a run's sft_result.json runs
it again, to the same adapter; a bad recipe is one line naming the file, before the model loads."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from test_sft import chat_model, cli, no_model_loading, one_error_line, pc_jsonl  # noqa: F401  (fixtures)

import giva.cli
from giva.cli import main


@pytest.fixture
def parsed(monkeypatch):
    """The options `giva sft` would run with, for each call of main (nothing trains)."""
    seen = []
    monkeypatch.setattr(giva.cli, "_sft", lambda args: seen.append(vars(args)) or 0)
    return seen


RECIPE = """# a QLoRA-style recipe
r: 4
lr: 0.02
max-steps: 30
target_modules: [q_proj, v_proj]
packing: true
bf16: false
eval_steps: null
"""


def test_a_recipe_sets_flags_and_the_command_line_overrides_them(tmp_path, parsed):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    assert main(["sft", "--config", str(recipe)]) == 0
    assert main(["sft", "--r", "4", "--lr", "0.02", "--max-steps", "30", "--target-modules", "q_proj,v_proj", "--packing"]) == 0
    from_recipe, from_flags = ({k: v for k, v in p.items() if k != "config"} for p in parsed)
    assert from_recipe == from_flags and from_recipe["r"] == 4 and from_recipe["packing"] is True
    assert main(["sft", "--lr", "0.5", "--config", str(recipe), "--r", "16"]) == 0  # given flags win, either side
    assert (parsed[-1]["lr"], parsed[-1]["r"], parsed[-1]["max_steps"]) == (0.5, 16, 30)
    recipe.with_suffix(".json").write_text(json.dumps({"r": 4, "packing": True}))  # JSON is YAML too
    assert main(["sft", "--config", str(recipe.with_suffix(".json"))]) == 0
    assert (parsed[-1]["r"], parsed[-1]["packing"]) == (4, True)


def test_a_runs_result_runs_it_again_to_the_same_adapter(chat_model, pc_jsonl, tmp_path, capsys):  # noqa: F811
    first = tmp_path / "first"
    assert main(cli(chat_model, pc_jsonl, first, "--lr", "0.03", "--dropout", "0.1", "--target-modules", "q_proj,v_proj")) == 0
    again = tmp_path / "again"
    assert main(["sft", "--config", str(first / "sft_result.json"), "--output-dir", str(again)]) == 0
    capsys.readouterr()
    runs = [json.loads((folder / "sft_result.json").read_text()) for folder in (first, again)]
    assert {k: v for k, v in runs[1]["options"].items() if k != "output_dir"} == \
        {k: v for k, v in runs[0]["options"].items() if k != "output_dir"}
    assert runs[1]["options"]["lr"] == 0.03 and runs[1]["val_loss_after"] == runs[0]["val_loss_after"]
    tensors = [load_file(folder / "adapter_model.safetensors") for folder in (first, again)]
    assert tensors[0].keys() == tensors[1].keys() and all(tensors[0][k].equal(tensors[1][k]) for k in tensors[0])


@pytest.mark.parametrize(("text", "expected"), [
    ("lr: 0.1\nlearning_rate: 0.1\n", "'learning_rate' is not a flag of giva sft"),
    ("packing: yes please\n", "'packing' (--packing) is a switch: expected true or false"),
    ("r: [1, {a: 2}]\n", "'r' (--r) takes a value"),
    ("- r\n- 4\n", "expected a mapping of giva sft flags to values"),
    ("r: 4\n  lr: [\n", "recipe.yaml:2: not valid YAML or JSON"),
    ("lr: -1\n", "argument --lr: must be > 0, got '-1' (in --config"),
    ("config: other.yaml\n", "'config' is not a flag of giva sft"),
    ("target_modules: []\n", "'target_modules' (--target-modules) takes a value, got an empty list"),
])
def test_a_bad_recipe_is_one_line_naming_the_file(tmp_path, capsys, no_model_loading, text, expected):  # noqa: F811
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    assert main(["sft", "--config", str(recipe)]) == 2
    line = one_error_line(capsys)
    assert expected in line and "recipe.yaml" in line, line


def test_a_missing_recipe_is_named(tmp_path, capsys, no_model_loading):  # noqa: F811
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) == 2
    line = one_error_line(capsys)
    assert "--config" in line and "nope.yaml': no such file" in line, line
