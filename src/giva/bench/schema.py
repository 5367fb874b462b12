"""The JSON schema of one benchmark run and of one speed measurement, and their validation."""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1
Number = (int, float)

# dotted key -> allowed type(s); every key is required.
_HEADER: dict[str, Any] = {
    "schema_version": int,
    "kind": str,
    "run_id": str,
    "suite": str,
    "phase": str,
    "task": dict,
}
RUN_SCHEMA: dict[str, Any] = {
    **_HEADER,
    "task.name": str,
    "task.model": str,
    "method": dict,
    "method.name": str,
    "method.version": int,
    "method.family": str,
    "ablation": (str, type(None)),
    "seed": int,
    "lr": Number,
    "head_lr": Number,
    "train_config": dict,
    "versions": dict,
    "versions.torch": str,
    "versions.peft": str,
    "versions.transformers": str,
    "versions.giva": str,
    "metrics.val_accuracy_per_epoch": list,
    "metrics.val_accuracy": Number,
    "metrics.test_accuracy": Number,
    "train_loss": list,
    "timing.init_seconds": Number,
    "timing.gradient_seconds": Number,
    "timing.svd_seconds": Number,
    "timing.train_seconds": Number,
    "timing.median_step_seconds": Number,
    "timing.total_seconds": Number,
    "timing.steps": int,
    "memory.peak_rss_bytes": int,
    "memory.how": str,
    "parameters.trainable": int,
    "parameters.trainable_adapter": int,
    "parameters.total": int,
    "adapter_bytes": int,
    "trainable_state_bytes": int,
    "data.n_train": int,
    "data.n_val": int,
    "data.n_test": int,
}

SPEED_SCHEMA: dict[str, Any] = {
    **_HEADER,
    "versions": dict,
    "steps": int,
    "warmup_steps": int,
    "methods": dict,
}
SPEED_METHOD_SCHEMA: dict[str, Any] = {
    "median_step_seconds": Number,
    "step_seconds": list,
    "init_seconds": Number,
    "trainable_adapter": int,
    "ratio_to_lora": (float, type(None)),
}


def _get(record: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _check(record: dict[str, Any], schema: dict[str, Any], where: str) -> list[str]:
    errors = []
    for key, kind in schema.items():
        present, value = _get(record, key)
        if not present:
            errors.append(f"{where}: missing key {key!r}")
        elif isinstance(value, bool) or not isinstance(value, kind):  # bool is an int subclass: never accepted
            errors.append(f"{where}: {key!r} should be {kind}, got {type(value).__name__}")
    return errors


def validate_run(record: dict[str, Any]) -> list[str]:
    """Problems with one run record (empty if it matches its schema)."""
    where = str(record.get("run_id", "<no run_id>"))
    if record.get("kind") == "speed":
        errors = _check(record, SPEED_SCHEMA, where)
        for name, entry in record.get("methods", {}).items():
            errors += _check(entry, SPEED_METHOD_SCHEMA, f"{where}/{name}")
        return errors
    errors = _check(record, RUN_SCHEMA, where)
    if not errors:
        untrained = record["method"].get("kind") == "none"
        if (not record["train_loss"] and not untrained) or not all(isinstance(x, Number) for x in record["train_loss"]):
            errors.append(f"{where}: train_loss must be a non-empty list of numbers (empty only for kind 'none')")
        if not 0.0 <= record["metrics"]["test_accuracy"] <= 1.0:
            errors.append(f"{where}: test_accuracy {record['metrics']['test_accuracy']} is not in [0, 1]")
        correct = record["metrics"].get("test_correct")  # per-example results (runs since issue 11)
        if correct is not None and (
            not isinstance(correct, str) or set(correct) - {"0", "1"} or len(correct) != record["data"]["n_test"]
            or abs(correct.count("1") / max(len(correct), 1) - record["metrics"]["test_accuracy"]) > 1e-9
        ):
            errors.append(f"{where}: metrics.test_correct must be one '0'/'1' per test example, agreeing with test_accuracy")
    return errors
