"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU with gloo: GiVA vectors and base weights sharded.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist/train_fsdp2.py OUT_DIR
"""

from __future__ import annotations

import teardown
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from train_common import adamw, finish, initialized_model, optimizer_step, probe_batch, train


def merge_round_trip(model) -> dict:
    """Merge and unmerge the trained adapter under FSDP2 after a forward (the sharded vectors are gathered, the delta
    written into each rank's shard of the weights): the merged model's logits, the base weights while merged and
    after the unmerge, as gathered full tensors."""
    def base_weights() -> dict:
        return {n: p.full_tensor().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}

    probe = probe_batch()["input_ids"]
    model.eval()
    with torch.no_grad():
        before, weights = model(input_ids=probe).logits, base_weights()
        model.merge_adapter()
        merged, merged_weights = model(input_ids=probe).logits, base_weights()
        model.unmerge_adapter()
        after, restored = model(input_ids=probe).logits, base_weights()
    return {
        "merged_logits_max_diff": float((merged - before).abs().max()),
        "merged_weights_changed": sum(not torch.equal(merged_weights[n], w) for n, w in weights.items()),
        "base_weights": len(weights),
        "unmerged_weights_max_diff": max(float((restored[n] - w).abs().max()) for n, w in weights.items()),
        "unmerged_logits_max_diff": float((after - before).abs().max()),
    }


def main() -> None:
    dist.init_process_group("gloo")
    model, batches, report = initialized_model(dist.get_rank())
    # One FSDP unit per decoder layer, then the root: parameters become DTensors sharded over ranks.
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = sum(1 for p in model.parameters() if type(p.data).__name__ == "DTensor")
    losses = train(model, batches, optimizer_step(adamw(model)))
    merge = merge_round_trip(model)
    finish(model, losses, {"calibration_loss": report.losses, "dtensor_parameters": sharded, **merge})
    teardown.end()  # every output is written: leave without finalisation (see teardown.py)


if __name__ == "__main__":
    main()
