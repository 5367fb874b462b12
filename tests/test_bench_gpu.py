"""`giva bench --suite gpu`: the row plan, launch counting, the ratios, and the tiny suite end to end on CPU."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType

from giva.bench import gpu
from giva.bench.gpu import FULL, ROWS, TINY, count_launches, plan, run_gpu, shape_ratios

BENCH_SRC = Path(gpu.__file__).parent


def _imports_of(path: Path) -> set[str]:
    """giva.bench modules ``path`` imports, at any depth (function-level imports too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(alias.name for alias in node.names)
    return out


def test_bench_modules_have_no_import_cycle():
    graph = {p.stem: _imports_of(p) & {q.stem for q in BENCH_SRC.glob("*.py")} for p in BENCH_SRC.glob("*.py")}
    graph["__init__"] = set()  # the package re-exports; a cycle through it is not a module cycle

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, {m}))
    assert cycles == []


def test_plan_runs_the_key_numbers_first_then_the_compiled_1b_step_then_the_cheap_rows():
    assert plan(FULL) == [
        ("8B", "floor"), ("8B", "lora"), ("8B", "lora-bf16"), ("8B", "giva"),
        ("1B", "floor"), ("1B", "lora"), ("1B", "lora-bf16"), ("1B", "giva"),
        ("1B", "giva-compiled"),  # 1B's targets are "compiled or eager"
        ("1B", "init-sketch"), ("8B", "init-sketch"),
        ("1B", "qlora-4bit"), ("1B", "giva-4bit"),  # 4-bit rows: the 1B base only
        ("1B", "init-exact"), ("1B", "loraga"),
        ("8B", "giva-compiled"),
        ("8B", "vera"), ("1B", "vera"),
        ("8B", "init-exact"), ("8B", "loraga"),
    ]
    assert sorted(plan(FULL)) == sorted({(s.name, r) for s in FULL.shapes for r in ROWS} - {("8B", r) for r in gpu.QUANT_ROWS})
    assert plan(replace(FULL, rows=("giva", "vera"), shapes=FULL.shapes[:1])) == [("1B", "giva"), ("1B", "vera")]
    assert {(s.name, s.hidden, s.intermediate, s.layers) for s in FULL.shapes} == {("1B", 2048, 5632, 22), ("8B", 4096, 14336, 32)}
    assert (FULL.rank, FULL.vera_rank, FULL.batch_size, FULL.seq_len, FULL.dtype) == (8, 256, 4, 1024, "bfloat16")


def test_settings_reject_unknown_rows():
    with pytest.raises(ValueError, match=r"GpuSettings.rows: unknown row\(s\) \['lora-r16'\]"):
        replace(TINY, rows=("floor", "lora-r16"))


def test_count_launches_counts_runtime_launch_calls_and_kernels():
    events = [("aten::mm", DeviceType.CPU), ("cudaLaunchKernel", DeviceType.CPU), ("cuLaunchKernelEx", DeviceType.CPU),
              ("cudaMemcpyAsync", DeviceType.CPU), ("cudaLaunchKernelExC_v11060", DeviceType.CPU),
              ("cudaLaunchHostFunc", DeviceType.CPU), ("aten::add_", DeviceType.CPU),
              ("sm90_xmma_gemm", DeviceType.CUDA), ("elementwise_kernel", DeviceType.CUDA),
              ("Memcpy HtoD (Pageable -> Device)", DeviceType.CUDA), ("Memset (Device)", DeviceType.CUDA)]
    assert count_launches(events) == {"kernel_launches": 3, "gpu_kernels": 2, "aten_ops": 2}  # copies are no kernels
    assert count_launches([("aten::mm", DeviceType.CPU)]) == {"kernel_launches": None, "gpu_kernels": None, "aten_ops": 1}


def test_profiler_events_reads_the_raw_results_as_prof_events_would():
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(8, 8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (x @ x).relu().sum()
    raw = gpu.profiler_events(prof)
    assert {"aten::mm", "aten::relu", "aten::sum"} <= {name for name, _ in raw}
    assert {name for name, _ in raw} == {e.name for e in prof.events()}  # the same events, without building the tree


def test_shape_ratios():
    def ok(**values):
        return {"status": "ok", **values}

    rows = {
        "floor": ok(median_step_seconds=0.2, peak_bytes=10),
        "lora": ok(median_step_seconds=0.5, peak_bytes=20),
        "lora-bf16": ok(median_step_seconds=0.4, peak_bytes=18),
        "giva": ok(median_step_seconds=0.35, peak_bytes=16),
        "giva-compiled": {"status": "failed", "error": "boom"},
        "init-sketch": ok(seconds=0.7, peak_bytes=8),
        "loraga": ok(seconds=1.4, peak_bytes=12),
    }
    r = shape_ratios(rows)
    assert r["giva_over_lora"] == pytest.approx(0.7)
    assert r["giva_over_lora_bf16"] == pytest.approx(0.875)
    assert r["giva_overhead_over_lora_bf16_overhead"] == pytest.approx(0.75)  # (0.35-0.2)/(0.4-0.2)
    assert r["init_sketch_peak_over_giva_step"] == pytest.approx(0.5)
    assert r["init_sketch_seconds_over_giva_step"] == pytest.approx(2.0)
    assert r["loraga_peak_over_giva_step"] == pytest.approx(0.75)
    for missing in ("giva-compiled_over_lora", "vera_over_lora", "init_exact_peak_over_giva_step", "giva_4bit_over_qlora_peak"):
        assert r[missing] is None


def test_floor_does_no_work_that_the_adapter_rows_skip():
    """The floor's backward starts where the adapters start it, so it computes no input gradient for the first
    block's projections (their input, the embeddings, needs none in any adapter row). Hidden 512 and r=8 make
    those three products (2 x tokens x 512 x 1024 FLOPs) larger than an adapter's own work, so a floor that
    ran them cost more FLOPs than GiVA."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = gpu.GpuShape("wide", 512, 1024, 1, 4, 2, vocab=256)
    settings = replace(TINY, shapes=(shape,))
    batch = gpu.make_batches(shape, settings, torch.device("cpu"), 1)[0]
    flops = {}
    for row in ("floor", "giva", "lora-bf16"):
        model = gpu.adapt(row, gpu.build_base(shape, settings, torch.device("cpu")), settings)
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        flops[row] = counter.get_total_flops()
        if row == "floor":
            assert not any(p.requires_grad for p in model.parameters())
            assert model.model.embed_tokens.weight.grad is None
    assert flops["floor"] < flops["giva"] and flops["floor"] < flops["lora-bf16"], flops


def test_compiled_row_compiles_in_the_warm_ups_and_counts_every_graph(tmp_path):
    """Two graphs (block 0's input needs no gradient, the other blocks' does), one recompilation for that, none after
    the warm-ups; the counts are read after every warm-up step, not after the first."""
    settings = replace(TINY, shapes=(gpu.GpuShape("t3", 64, 160, 3, 4, 2, vocab=256),), warmup_steps=2, steps=2)
    record = gpu.run_row("giva-compiled", settings.shapes[0], settings, torch.device("cpu"), tmp_path)
    assert record["compiled_blocks"] == 3
    assert record["dynamo_unique_graphs"] == 2 and record["dynamo_graph_breaks"] == 0
    assert record["dynamo_recompiles"] == 1 and "requires_grad" in record["dynamo_recompile_reasons"][0]
    assert record["dynamo_frames_compiled_after_warmup"] == 0
    assert len(record["warmup_step_seconds"]) == 2 and record["compile_seconds"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_full_shapes_on_cpu_fail_before_any_work(tmp_path, capsys):
    from giva.cli import main

    out = tmp_path / "gpu"
    with pytest.raises(ValueError, match=r"need a CUDA device; on CPU run the tiny shapes \(--tiny, or giva bench --suite gpu --quick\)"):
        run_gpu(out, FULL)
    assert main(["bench", "--suite", "gpu", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "giva bench: the gpu suite's full shapes (1B and 8B) need a CUDA device; on CPU run the tiny shapes "
        "(--tiny, or giva bench --suite gpu --quick)")
    assert not out.exists()


def test_dry_run_lists_the_rows(capsys):
    from giva.cli import main

    assert main(["bench", "--suite", "gpu", "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[: len(plan(FULL))] == [f"{shape}/{row}" for shape, row in plan(FULL)]


def test_giva_bench_runs_the_tiny_shapes_with_quick_and_refuses_report_only(tmp_path, monkeypatch, capsys):
    import giva.bench.gpu
    from giva.cli import main

    calls = []

    def fake_run_gpu(out, settings, command=""):
        calls.append((out, settings, command))
        return {"headlines": ["tiny-a: ..."], "output_dir": str(out), "n_runs": 0, "ran": [], "problems": []}

    monkeypatch.setattr(giva.bench.gpu, "run_gpu", fake_run_gpu)  # the package imports it where a request reaches it
    assert main(["bench", "--suite", "gpu", "--quick", "--output-dir", str(tmp_path)]) == 0
    assert calls == [(tmp_path, TINY, "giva bench --suite gpu --quick")]
    assert main(["bench", "--suite", "gpu", "--report-only"]) == 2
    assert "--report-only applies to training suites; the 'gpu' suite writes its report as it runs" in capsys.readouterr().err


def test_time_budget_skips_rows_and_still_writes_everything(tmp_path):
    results = run_gpu(tmp_path, replace(TINY, budget_s=0.0), device="cpu")
    assert [(r["shape"], r["row"]) for r in results["rows"]] == plan(TINY)
    assert {r["status"] for r in results["rows"]} == {"skipped"}
    assert all(re.fullmatch(r"time budget of 0 s: \d+ s spent, the row would take about \d+ s", r["reason"]) for r in results["rows"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is True and len(saved["rows"]) == len(plan(TINY))
    assert "Not measured:" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "steps.png").read_bytes()[:4] == b"\x89PNG"


def test_a_row_expected_to_pass_the_budget_is_skipped_and_cheaper_ones_still_run(tmp_path):
    settings = replace(TINY, shapes=TINY.shapes[:1], rows=("floor", "giva-compiled", "vera"), steps=1, budget_s=600.0,
                       expected_seconds=(("tiny-a", "compile", 1000.0),))
    rows = {r["row"]: r for r in run_gpu(tmp_path, settings, device="cpu")["rows"]}
    assert rows["floor"]["status"] == rows["vera"]["status"] == "ok"
    assert rows["giva-compiled"]["status"] == "skipped"
    assert rows["giva-compiled"]["reason"].endswith("s spent, the row would take about 1000 s")
    assert rows["vera"]["expected_seconds"] == round(rows["floor"]["row_seconds"], 1)  # the measured step row's time


def _fake_row(row, shape, settings, device, scratch):
    return {"median_step_seconds": 0.1, "peak_bytes": 1000, "step_seconds": [0.1], "aten_ops": 1, "kernel_launches": None}


def test_an_interrupt_keeps_every_row_measured_and_names_the_rest(tmp_path, monkeypatch, capsys):
    """The device script stops a stage with SIGINT at its time limit: the rows measured so far stay in results.json,
    results.md and steps.png, the row it stopped and the ones not reached are named, and main exits 130."""
    calls = []

    def stopped_in_the_second_row(*args):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_row(*args)

    monkeypatch.setattr(gpu, "run_row", stopped_in_the_second_row)
    assert gpu.main(["--tiny", "--shapes", "tiny-a", "--rows", "floor,lora,giva", "--output-dir", str(tmp_path)]) == 130
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["complete"] is False
    assert [(r["row"], r["status"]) for r in saved["rows"]] == [("floor", "ok"), ("lora", "interrupted"), ("giva", "skipped")]
    assert saved["rows"][2]["reason"].startswith("not reached: interrupted at")
    report = (tmp_path / "results.md").read_text()
    assert "- tiny-a / lora: interrupted: interrupted (SIGINT)" in report and "(still running or cut short)" in report
    assert (tmp_path / "steps.png").read_bytes()[:4] == b"\x89PNG"
    assert report in capsys.readouterr().out  # the table so far, in the log


def test_results_are_written_after_every_row(tmp_path, monkeypatch):
    seen = []

    def record_what_is_on_disk(*args):
        saved = tmp_path / "results.json"
        seen.append((len(json.loads(saved.read_text())["rows"]) if saved.exists() else 0, (tmp_path / "steps.png").exists()))
        return _fake_row(*args)

    monkeypatch.setattr(gpu, "run_row", record_what_is_on_disk)
    run_gpu(tmp_path, replace(TINY, rows=("floor", "lora", "giva")), device="cpu")
    assert seen == [(0, False), (1, True), (2, True), (3, True), (4, True), (5, True)]


def test_a_machine_without_matplotlib_gets_every_table_and_one_warning(tmp_path, monkeypatch, caplog):
    """The device image may lack matplotlib: the rows and tables are written, and the missing figure is said once
    (not a traceback after every row)."""
    monkeypatch.setattr(gpu, "run_row", _fake_row)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with caplog.at_level("WARNING", logger=gpu.logger.name):
        run_gpu(tmp_path, replace(TINY, rows=("floor", "lora", "giva")), device="cpu")
    assert len(json.loads((tmp_path / "results.json").read_text())["rows"]) == 6
    assert (tmp_path / "results.md").exists() and not (tmp_path / "steps.png").exists()
    said = [r for r in caplog.records if "steps.png not written" in r.getMessage()]
    assert len(said) == 1 and said[0].exc_info is None and "matplotlib" in said[0].getMessage()


def test_initialisation_rows_that_cannot_fit_in_free_memory_are_skipped_with_what_they_need(monkeypatch):
    big = FULL.shapes[1]
    targeted, total = gpu.shape_parameters(big)
    assert (round(targeted / 1e9, 2), round(total / 1e9, 2)) == (6.98, 7.24)  # Llama 3 8B's, with a 32000 vocabulary
    done = [{"shape": "8B", "row": "giva", "status": "ok", "peak_bytes": 45 * 2**30}]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda", 0)
    assert gpu.memory_problem("init-exact", big, cuda, done) == (
        "needs about 71 GiB (a GiVA step's peak 45 GiB + the fp32 gradient matrices G of the targeted weights), 60 GiB free")
    assert gpu.memory_problem("loraga", big, cuda, done) is None  # 45 + 13 GiB
    assert gpu.memory_problem("init-sketch", big, cuda, done) is None
    assert gpu.memory_problem("init-exact", big, torch.device("cpu"), done) is None


@pytest.mark.bench
def test_tiny_suite_end_to_end(tmp_path):
    settings = replace(TINY, shapes=TINY.shapes[:1], steps=2, init_batches=1)
    results = run_gpu(tmp_path, settings, device="cpu", command="test")
    assert results["problems"] == []
    saved = json.loads((tmp_path / "results.json").read_text())
    for key, kind in {"schema_version": int, "settings": dict, "environment": dict, "rows": list, "ratios": dict,
                      "elapsed_seconds": float, "complete": bool}.items():
        assert isinstance(saved[key], kind), key
    assert saved["complete"] is True
    for key in ("torch", "transformers", "peft", "giva", "cuda", "gpu", "bitsandbytes"):
        assert key in saved["environment"]
    rows = {r["row"]: r for r in saved["rows"]}
    assert list(rows) == [row for _, row in plan(settings)] and set(rows) == set(ROWS)
    quant_skipped = gpu.bitsandbytes_problem()
    for name, record in rows.items():
        if name in gpu.QUANT_ROWS and quant_skipped:
            assert record["status"] == "skipped" and record["reason"] == quant_skipped
            continue
        assert record["status"] == "ok", record
        assert record["peak_bytes"] > 0
        if name in gpu.INIT_ROWS:
            assert record["seconds"] > 0
        else:
            assert record["median_step_seconds"] > 0 and len(record["step_seconds"]) == settings.steps
            assert record["aten_ops"] > 0 and record["kernel_launches"] is None  # no CUDA here
    assert rows["floor"]["trainable_parameters"] == 0
    assert rows["lora"]["trainable_dtypes"] == ["float32"] and rows["lora-bf16"]["trainable_dtypes"] == ["bfloat16"]
    assert rows["giva-compiled"]["compiled_blocks"] == settings.shapes[0].layers
    assert rows["giva-compiled"]["dynamo_unique_graphs"] == 2  # block 0's graph and the other blocks'
    assert rows["giva-compiled"]["dynamo_frames_compiled_after_warmup"] == 0
    ratios = saved["ratios"][settings.shapes[0].name]
    expected_none = {k for k in ratios if "4bit" in k} if quant_skipped else set()
    assert {k for k, v in ratios.items() if v is None} == expected_none
    assert ratios["giva_over_lora"] == pytest.approx(rows["giva"]["median_step_seconds"] / rows["lora"]["median_step_seconds"])
    table = (tmp_path / "results.md").read_text()
    for name in ROWS:
        assert f"| {gpu.ROW_LABELS[name]} |" in table
    assert f"torch {torch.__version__}" in table and f"PEFT {saved['environment']['peft']}" in table
    assert (tmp_path / "steps.png").read_bytes()[:4] == b"\x89PNG"


def test_the_device_script_fetches_pins_within_giva_s_requirements():
    """`run_on_device.sh --fetch` downloads the wheels the GPU machine lacks at the pins at the top of the script: one
    pin per package, PEFT, TRL and bitsandbytes within what giva requires (pyproject.toml, MIN_PEFT_VERSION), datasets
    within what that TRL asks for. (Whether a pin is the version the tests here ran with, --fetch says when it runs:
    a newer release installed here would otherwise fail this test.)"""
    from packaging.requirements import Requirement
    from packaging.version import Version

    from giva.peft_compat import MIN_PEFT_VERSION

    root = BENCH_SRC.parents[2]
    script = (root / "benchmarks/gpu/run_on_device.sh").read_text()
    block = re.search(r"^PEFT_PIN=.*?^SFT_PINS=\(.*?\)", script, re.M | re.S).group(0)
    pins = re.findall(r"\b([a-z]+)==([0-9][0-9.]*)", block)
    assert sorted(name for name, _ in pins) == ["bitsandbytes", "datasets", "dill", "multiprocess", "peft", "trl"]
    pins = {name: Version(version) for name, version in pins}
    assert pins["peft"] >= Version(MIN_PEFT_VERSION)
    (peft_requirement,) = re.findall(r'"(peft[<>=!~][^"]*)"', (root / "pyproject.toml").read_text())
    assert pins["peft"] in Requirement(peft_requirement).specifier, peft_requirement
    extras = re.findall(r'"((?:trl|bitsandbytes|datasets)[<>=!~][^"]*)"', (root / "pyproject.toml").read_text())
    assert {Requirement(r).name for r in extras} == {"trl", "bitsandbytes", "datasets"}  # the loop below checks each
    for requirement in map(Requirement, extras):  # the sft and quant extras (and the test extra's looser ones)
        assert pins[requirement.name] in requirement.specifier, requirement
    assert pins["datasets"] >= Version("4.7")  # TRL 1.16's floor


def test_device_script_selects_every_cuda_test():
    """The tests stage runs ``pytest -m cuda`` over the files the script names: every test file with a ``cuda`` mark is
    among them, and the selection holds the CUDA tests (the stream test too, whose mark is no keyword)."""
    root = BENCH_SRC.parents[2]
    script = (root / "benchmarks/gpu/run_on_device.sh").read_text()
    files = re.search(r'^CUDA_TESTS="([^"]+)"$', script, re.M).group(1).split()
    assert "-m cuda $CUDA_TESTS" in script
    uses_mark = re.compile(r"pytest\.mark\.cuda\b")
    marked = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py") if uses_mark.search(p.read_text()))
    assert marked == sorted(files)
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "cuda", *files],
                            cwd=root, capture_output=True, text=True, timeout=300)
    selected = [line for line in listed.stdout.splitlines() if "::" in line]
    assert "tests/test_serving.py::test_mixed_batch_stacks_used_on_another_stream_are_recorded_on_it" in selected, listed.stdout[-2000:]
    assert any("test_mixed_batch_on_cuda_never_synchronises_the_host" in t for t in selected)
    assert any("test_nf4_on_cuda_with_bf16_compute" in t for t in selected)
    assert any("test_training_step_runs_nothing_per_token_but_matmuls" in t and "cuda" in t for t in selected)
    assert not any("test_training_step_runs_nothing_per_token_but_matmuls" in t and "cpu" in t for t in selected)
    sft = [t for t in selected if t.startswith("tests/test_sft.py::")]
    assert sorted(sft) == sorted([f"tests/test_sft.py::test_a_run_trains_on_its_device_and_reloads_as_it_was_trained[{r}-cuda]"
                                  for r in ("fp32", "bf16", "nf4-bf16", "int8")]
                                 + ["tests/test_sft.py::test_a_packed_step_is_the_padded_step_over_the_same_rows[sdpa-cuda]"])


def test_a_cheap_initialisation_row_does_not_vouch_for_the_dear_ones():
    """init-sketch measured first must not lower the estimate of init-exact / loraga (dense gradients, an SVD each)
    below their guess: they would start on an underestimate and run into the stage's time limit."""
    from giva.bench.gpu import FULL, expected_seconds

    done = [{"shape": "8B", "row": "init-sketch", "status": "ok", "row_seconds": 12.0}]
    for row in ("init-exact", "loraga"):
        assert expected_seconds(FULL, "8B", row, []) == expected_seconds(FULL, "8B", row, done) == 45.0
    assert expected_seconds(FULL, "8B", "init-sketch", done) == 30.0  # never below its own guess either
    slow = [{"shape": "8B", "row": "init-exact", "status": "ok", "row_seconds": 80.0}]
    assert expected_seconds(FULL, "8B", "loraga", slow) == 80.0  # a measured row of the group above the guess wins


def test_a_measured_step_or_4bit_row_replaces_its_groups_guess():
    """Step rows cost alike: a guess kept as a floor (30 s at 8B) over a measured 12 s skipped rows that would fit."""
    from giva.bench.gpu import FULL, expected_seconds

    done = [{"shape": "8B", "row": "floor", "status": "ok", "row_seconds": 12.0},
            {"shape": "8B", "row": "lora", "status": "ok", "row_seconds": 14.0},
            {"shape": "1B", "row": "qlora-4bit", "status": "ok", "row_seconds": 9.0},
            {"shape": "8B", "row": "lora-bf16", "status": "failed", "row_seconds": 99.0}]
    assert expected_seconds(FULL, "8B", "giva", []) == 30.0
    assert expected_seconds(FULL, "8B", "giva", done) == 14.0
    assert expected_seconds(FULL, "1B", "giva", done) == 15.0  # another shape's rows say nothing
    assert expected_seconds(FULL, "1B", "giva-4bit", done) == 9.0
    assert expected_seconds(FULL, "8B", "giva-compiled", done) == 130.0  # the compile guess stays


def test_on_a_gpu_a_missing_launch_count_is_not_filled_with_aten_operators(tmp_path):
    from giva.bench.gpu import write_report

    env = {"gpu": "NVIDIA H100", "device": "cuda:0", "torch": "2.11", "cuda": "13.0", "transformers": "5.17",
           "peft": "0.22.0", "giva": "x", "bitsandbytes": None, "python": "3.12"}
    record = {"shape": "1B", "row": "giva", "label": "", "status": "ok", "median_step_seconds": 0.1,
              "peak_bytes": 2e9, "kernel_launches": None, "aten_ops": 1234}
    results = {"environment": env, "settings": asdict(replace(FULL, shapes=FULL.shapes[:1])), "rows": [record],
               "ratios": {}, "command": "c", "elapsed_seconds": 1.0, "complete": True}
    write_report(tmp_path, results)
    row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| GiVA r=8, eager"))
    assert row.split(" | ")[1:] == ["100.0", "2.00", "- |"] and "1234" not in row
    write_report(tmp_path, {**results, "environment": {**env, "gpu": None, "device": "cpu"}})
    assert "| 1234 |" in (tmp_path / "results.md").read_text()  # on CPU the aten operators stand in


@pytest.mark.parametrize("row", ["giva", "giva-compiled"])
def test_a_rows_model_is_freed_when_the_row_ends(tmp_path, monkeypatch, row):
    """Nothing of a row (dynamo's caches of the compiled one included) keeps its model alive into the next row's
    peak memory; on a GPU each record's allocated_bytes_before shows the same."""
    import gc
    import weakref

    settings = replace(TINY, shapes=TINY.shapes[:1], steps=1)
    bases = []
    adapt = gpu.adapt
    monkeypatch.setattr(gpu, "adapt", lambda r, base, s: bases.append(weakref.ref(base)) or adapt(r, base, s))
    record = gpu.run_row(row, settings.shapes[0], settings, torch.device("cpu"), tmp_path)
    assert record["median_step_seconds"] > 0
    gc.collect()
    assert len(bases) == 1 and bases[0]() is None
