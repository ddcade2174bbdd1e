"""The "recovery" record of compression.json, shared by distillation and fine-tuning."""
from __future__ import annotations

import math

from nnunet_green.contract import CompressionManifest


def add_recovery(manifest: CompressionManifest, record: dict) -> CompressionManifest:
    """`record` (with its "kind": contract.RECOVERY_*) becomes the manifest's recovery; an earlier one moves to
    `recovery_history`. Non-finite numbers (a diverged check) are stored as null: compression.json is strict JSON."""
    if manifest.recovery:
        manifest.extra.setdefault("recovery_history", []).append(manifest.recovery)
    manifest.recovery = json_safe(record)
    return manifest


def json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
