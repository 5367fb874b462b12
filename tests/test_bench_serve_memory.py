"""The serve suite's byte counts (giva.bench.serve_memory, issue 24): what an extra adapter costs equals the
arithmetic of its tensors, the suite lists and measures only the models its adapter_memory.json lacks, and the
committed table is what the committed records give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import giva.bench.serve_memory as memory
from giva.bench.serve import ServeModel, ServeSettings, plan_serve, run_serve
from giva.bench.serve_memory import ADAPTERS, FILE_ADAPTERS, MemoryModel, MemoryTables
from tiny_models import tiny_bert, tiny_llama

SERVE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "serve"

# tiny_llama, per decoder block (in, out): q 32->32, k 32->16, v 32->16, o 32->32, gate 32->64, up 32->64, down 64->32
BLOCK = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
SHAPES = BLOCK * 2


def _expected(name: str) -> int:
    """Bytes one extra adapter must add, from the layer shapes alone (r = 8, VeRA r = 64)."""
    giva_a = sum(8 * i for i, _ in SHAPES)
    giva_vectors = sum(8 + o for _, o in SHAPES)
    lora = sum(8 * (i + o) for i, o in SHAPES)
    vera = sum(64 + o for _, o in SHAPES)
    return {
        "GiVA r=8, fp32": 4 * (giva_a + giva_vectors),
        "GiVA r=8, A bf16 + fp32 vectors": 2 * giva_a + 4 * giva_vectors,
        "GiVA r=8, bf16": 2 * (giva_a + giva_vectors),
        "LoRA r=8, fp32": 4 * lora,
        "LoRA r=8, bf16": 2 * lora,
        "VeRA r=64 (save_projection=False), fp32": 4 * vera,
        "VeRA r=64 (save_projection=False), bf16": 2 * vera,
        "VeRA r=64 (save_projection=True), fp32": 4 * vera,
    }[name]


def _tables(**kwargs) -> MemoryTables:
    return MemoryTables(
        models=(MemoryModel("tiny-llama", tiny_llama),), file_models=(MemoryModel("tiny-bert", tiny_bert, ("query", "value")),),
        **kwargs,
    )


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_bytes_per_extra_adapter_equal_the_arithmetic_of_its_tensors(name: str) -> None:
    row, shapes = memory.measure_adapter(MemoryModel("tiny-llama", tiny_llama), ADAPTERS[name])
    assert shapes == SHAPES and row["layers"] == 14
    assert row["memory_per_extra_adapter"] == row["arithmetic_per_extra_adapter"] == _expected(name)
    bf16 = "bf16" in name
    assert row["extra_adapter_dtypes"] == (["bfloat16", "float32"] if "A bf16" in name else ["bfloat16"] if bf16 else ["float32"])
    if name.startswith("GiVA"):  # the first adapter also holds the shared B (out x r per layer), fp32 in every row
        assert row["memory_first_adapter"] - row["memory_per_extra_adapter"] == 4 * sum(8 * o for _, o in SHAPES)


def test_the_plan_lists_the_missing_models_and_a_rerun_measures_only_those(tmp_path: Path, monkeypatch) -> None:
    tables = _tables()
    assert memory.plan_adapter_memory(tmp_path, tables) == [
        "serve: adapter memory: tiny-llama, 8 adapters, in memory and on disk",
        "serve: adapter files: tiny-bert (query,value, with its head), 5 adapters",
    ]
    first = memory.run_adapter_memory(tmp_path, tables)
    assert len(first["ran"]) == len(ADAPTERS) + len(FILE_ADAPTERS)
    assert memory.plan_adapter_memory(tmp_path, tables) == []
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(saved) == ["adapter_memory.json", "adapter_memory.md"]

    def measured_again(*args, **kwargs):
        raise AssertionError("a recorded model was measured again")

    monkeypatch.setattr(memory, "measure_adapter", measured_again)
    monkeypatch.setattr(memory, "measure_file", measured_again)
    assert memory.run_adapter_memory(tmp_path, tables)["ran"] == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved  # the same JSON and table, byte for byte

    # one adapter row lost (as if interrupted): only its model is listed, and measured again
    records = json.loads(saved["adapter_memory.json"])
    records["rows"] = records["rows"][:-1]
    (tmp_path / "adapter_memory.json").write_text(json.dumps(records))
    assert memory.plan_adapter_memory(tmp_path, tables) == ["serve: adapter memory: tiny-llama, 8 adapters, in memory and on disk"]
    monkeypatch.undo()
    again = memory.run_adapter_memory(tmp_path, tables)
    assert again["ran"] == [f"tiny-llama/{name}" for name in ADAPTERS]
    assert json.loads((tmp_path / "adapter_memory.json").read_text())["rows"] == json.loads(saved["adapter_memory.json"])["rows"]
    # other targets: the records are not comparable, so everything is listed again
    other = MemoryTables(models=(MemoryModel("tiny-llama", tiny_llama, ["q_proj"]),), file_models=tables.file_models)
    assert len(memory.plan_adapter_memory(tmp_path, other)) == 2


def test_the_serve_suite_plans_and_writes_the_byte_counts_before_its_timings(tmp_path: Path, monkeypatch) -> None:
    tiny = ServeModel("tiny-llama", tiny_llama, "all-linear", batch_size=2, seq_len=4, vocab_size=100, methods=("giva", "lora"))
    settings = ServeSettings(ns=(1,), rounds=1, r=4)
    tables = _tables(adapters=("GiVA r=8, fp32", "LoRA r=8, fp32"))
    planned = plan_serve(tmp_path, (tiny,), settings, memory=tables)
    assert planned[:2] == memory.plan_adapter_memory(tmp_path, tables) and planned[2].startswith("serve: tiny-llama N=1:")
    assert plan_serve(tmp_path, (tiny,), settings) == planned[2:]  # explicit models: no byte counts unless asked
    result = run_serve(tmp_path, (tiny,), settings, progress=False, memory=tables)
    assert len(result["memory_ran"]) == 2 + len(FILE_ADAPTERS)
    assert plan_serve(tmp_path, (tiny,), settings, memory=tables) == []
    table = (tmp_path / "adapter_memory.md").read_text()
    assert "| tiny-llama | GiVA r=8, fp32 | float32 | 18 KiB | 18 KiB | 0.576 |" in table
    assert "| tiny-bert | query,value | GiVA r=8 (Vr: B regenerated from seed) |" in table


def test_the_committed_table_is_what_the_committed_records_give() -> None:
    records = json.loads((SERVE / "adapter_memory.json").read_text())
    assert memory.memory_report(records) == (SERVE / "adapter_memory.md").read_text()
    assert records["meta"]["settings"] == json.loads(json.dumps(MemoryTables().settings()))
    assert memory.plan_adapter_memory(SERVE) == []  # complete: `giva bench --suite serve` measures nothing
    assert all(r["memory_per_extra_adapter"] == r["arithmetic_per_extra_adapter"] for r in records["rows"])
    assert {(r["model"], r["adapter"]) for r in records["rows"]} == {(m, a) for m in ("MiniLM-L6", "SmolLM2-135M") for a in ADAPTERS}
    assert [r["adapter"] for r in records["files"]] == list(FILE_ADAPTERS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapters": ("GiVA r=8, fp16",)}, r"MemoryTables.adapters must be among \['GiVA r=8, fp32', .*got \['GiVA r=8, fp16'\]"),
        ({"adapters": ()}, r"MemoryTables.adapters must be among"),
        ({"models": (MemoryModel("a", tiny_llama), MemoryModel("a", tiny_llama))}, r"MemoryTables.models must have distinct, non-empty names, got \['a', 'a'\]"),
        ({"file_models": (MemoryModel("", tiny_bert),)}, r"MemoryTables.file_models must have distinct, non-empty names"),
    ],
)
def test_bad_tables_are_refused_in_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemoryTables(**kwargs)


def test_an_output_folder_that_is_a_file_is_refused_before_any_model_loads(tmp_path: Path) -> None:
    def never() -> None:
        raise AssertionError("a model was loaded")

    target = tmp_path / "serve"
    target.write_text("not a folder")
    tables = MemoryTables(models=(MemoryModel("x", never),), file_models=(MemoryModel("y", never),))
    with pytest.raises(NotADirectoryError, match=f"serve output folder {target} is a file"):
        memory.run_adapter_memory(target, tables)
    with pytest.raises(NotADirectoryError, match=f"serve output folder {target} is a file"):
        run_serve(target, memory=tables)
    assert target.read_text() == "not a folder"


def test_on_a_cuda_machine_the_dry_run_also_lists_the_missing_byte_counts_first(tmp_path: Path, monkeypatch) -> None:
    import torch

    from giva.bench import plan_benchmark
    from giva.bench.serve import serve_plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    planned = plan_benchmark("serve", output_dir=tmp_path, root=SERVE.parents[1])["runs"]
    assert planned[:3] == memory.plan_adapter_memory(tmp_path) and planned[3:] == serve_plan()
    assert planned[3].startswith("serve (gpu): Llama 1B-shaped")
    assert plan_benchmark("serve", output_dir=SERVE, root=SERVE.parents[1])["runs"] == serve_plan()  # recorded: none


def test_an_interrupted_rewrite_keeps_the_records_whole(tmp_path: Path, monkeypatch) -> None:
    """A kill while the records are rewritten (here: at the rename) leaves the previous file as it was, and no
    temporary file: a rerun resumes from intact records instead of a truncated JSON."""
    import shutil

    import giva.bench.runner as runner

    for name in ("adapter_memory.json", "adapter_memory.md"):
        shutil.copy(SERVE / name, tmp_path / name)
    before = (tmp_path / "adapter_memory.json").read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        memory.run_adapter_memory(tmp_path)  # every model recorded: measures nothing, rewrites both files
    assert (tmp_path / "adapter_memory.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_memory.json", "adapter_memory.md"]
