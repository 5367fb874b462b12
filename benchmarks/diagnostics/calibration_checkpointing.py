"""Peak memory of GiVA's calibration against a training step, with and without activation checkpointing.

Under gradient checkpointing a training step keeps each block's input and recomputes the rest in the backward; the
calibration (``giva.initialize``) should keep no more. Each measurement runs in a fresh process (peak RSS only grows):
it builds a random-init Llama whose activations, not weights, dominate (hidden 256, MLP 1024, 8 layers, vocab 1024,
2 x 1024 tokens, fp32, GiVA r=8 on all seven projections), resets the kernel's peak-RSS counter, then runs one thing:

* ``step``  one GiVA training step (forward, backward, AdamW) after its bases were set from 8 tokens (before the reset)
* ``init``  ``giva.initialize`` (mode auto, 2 batches)

each with checkpointing on (``use_reentrant=False``) and off. What is compared is the peak RSS above the RSS at the
reset (the model and batches are built by then in both), with glibc told to return every allocation of 64 KiB or
more when it is freed (``MALLOC_MMAP_THRESHOLD_``), so that the peak is that of live memory.

Usage: .venv/bin/python benchmarks/diagnostics/calibration_checkpointing.py [OUT.json]   (about 1 min on 2 cores)
default OUT: benchmarks/results/diagnostics/calibration_checkpointing.json. To measure other code (an older commit),
put its ``src`` first on PYTHONPATH; the record names the commit of the code it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]
KINDS = ("step", "init")
SHAPE = {"hidden": 256, "intermediate": 1024, "layers": 8, "heads": 8, "kv_heads": 4, "vocab": 1024,
         "batch": 2, "seq_len": 1024, "num_batches": 2, "r": 8}


def measure(kind: str, checkpointing: bool) -> dict:
    """One measurement, in this process."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import giva
    from giva.bench.runner import peak_rss_bytes, proc_status_bytes, reset_peak_rss
    from giva.bench.versions import code_commit

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"],
                         num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                         num_key_value_heads=SHAPE["kv_heads"], max_position_embeddings=SHAPE["seq_len"], use_cache=False)
    base = LlamaForCausalLM(config)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, giva.GivaConfig(r=SHAPE["r"], target_modules=targets))
    model.train()
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(SHAPE["num_batches"]):
        ids = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq_len"]), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    if kind == "step":
        # bases from 8 tokens, so that setting them leaves this process's RSS where the model left it (the step's
        # memory does not depend on the bases' values)
        giva.initialize(model, [{k: v[:1, :8] for k, v in batches[0].items()}], num_batches=1, progress=False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    how = reset_peak_rss()
    before = proc_status_bytes("VmRSS")
    start = time.perf_counter()
    if kind == "step":
        model(**batches[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        giva.initialize(model, batches, num_batches=SHAPE["num_batches"], progress=False)
    seconds = time.perf_counter() - start
    return {"kind": kind, "checkpointing": checkpointing, "peak_rss": peak_rss_bytes(), "rss_before": before,
            "seconds": seconds, "peak_how": how, "commit": code_commit(), "torch": torch.__version__}


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], sys.argv[3] == "on")))
        return 0
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/results/diagnostics/calibration_checkpointing.json"
    # glibc keeps freed heap memory in the process (RSS then tracks its high-water mark, not live tensors: measured
    # here, 6 calibration batches peaked alike with and without the change this diagnostic checks); from 64 KiB up it
    # maps each allocation on its own and returns it when freed, so RSS follows what is alive.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "MALLOC_MMAP_THRESHOLD_": "65536"}
    records = []
    for checkpointing in (True, False):
        for kind in KINDS:
            done = subprocess.run([sys.executable, __file__, "--one", kind, "on" if checkpointing else "off"],
                                  capture_output=True, text=True, env=env, check=True)
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(records[-1])
    peak = {(r["kind"], r["checkpointing"]): r["peak_rss"] - r["rss_before"] for r in records}
    mib = {f"{kind}_{'checkpointed' if on else 'plain'}": round(value / 2**20) for (kind, on), value in peak.items()}
    ratios = {f"init_over_step_{'checkpointed' if on else 'plain'}": peak[("init", on)] / peak[("step", on)]
              for on in (True, False)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": SHAPE, "malloc_mmap_threshold": env["MALLOC_MMAP_THRESHOLD_"], "records": records,
                               "peak_above_rss_before_mib": mib, "ratios_of_peak_above_rss_before": ratios}, indent=1) + "\n")
    print(json.dumps({**mib, **ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
