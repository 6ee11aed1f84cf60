"""The process-wide settings a training process runs under. The training entry point applies them before it
trains, and every benchmark before it times, so that a benchmark times the arithmetic training runs."""

import torch

from adaptive_attn.host_memory import keep_freed_memory


def apply_training_settings() -> dict:
    """Float32 matmuls at "high" precision, subnormal floats flushed to zero (CPU arithmetic on them, such as
    tiny indexer-loss gradients, is many times slower) and freed host memory kept in malloc's heap (large
    tensors reuse it instead of faulting in fresh pages every step) -> what took effect, for records."""
    torch.set_float32_matmul_precision("high")
    return {
        "matmul_precision": torch.get_float32_matmul_precision(),
        "flush_denormal": torch.set_flush_denormal(True),
        "kept_heap": keep_freed_memory(),
    }
