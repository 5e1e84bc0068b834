"""Every fuzz target, by name (the rows of ``scripts/fuzz_readers.py``'s table)."""

from __future__ import annotations

from fuzzing import target_bundle, target_config, target_safetensors, target_tokenizer
from fuzzing.harness import Target

TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        target_bundle.TARGET,
        target_safetensors.TARGET,
        *target_config.TARGETS,
        target_tokenizer.TARGET,
    ]
}
