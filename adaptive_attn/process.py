"""The training process: the process-wide settings it runs under, and the device it runs on. The training entry
point applies the settings before it trains, and every benchmark before it times, so that a benchmark times
the arithmetic training runs; runs and benchmarks name the device, since their times depend on it."""

import platform

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


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The device, for a table's header: CPU ratios to dense move with the CPU's vector units (flash SDPA
    gains more from AVX-512 than the rest of a step), so a CPU names its model and torch's capability."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    capability = torch.backends.cpu.get_cpu_capability()
    return f"cpu ({cpu_model()}, {capability}, {torch.get_num_threads()} threads)"
