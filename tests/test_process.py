"""The training process's settings: what `apply_training_settings` sets, and that the training entry point and
every benchmark apply it before they work, so that a benchmark times the arithmetic training runs."""

import json
import platform
import subprocess
import sys

# in a process of its own (the settings are process-wide): a subnormal float before and after, and what took
PROBE = """
import json
import torch
from adaptive_attn.process import apply_training_settings

tiny = torch.tensor([1e-40])  # subnormal in float32
before = (tiny * 1.0).item(), torch.get_float32_matmul_precision()
took = apply_training_settings()
after = (tiny * 1.0).item(), torch.get_float32_matmul_precision()
print(json.dumps({"before": before, "after": after, "took": took}))
"""


def test_the_settings_flush_subnormals_raise_matmul_precision_and_keep_the_heap():
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe["before"][0] > 0 and probe["before"][1] == "highest"  # torch's defaults
    assert probe["after"][1] == "high" and probe["took"]["matmul_precision"] == "high"
    if probe["took"]["flush_denormal"]:  # where the CPU supports it (x86 with SSE3, ARM)
        assert probe["after"][0] == 0.0
    assert probe["took"]["kept_heap"] == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_the_training_entry_point_applies_the_settings_before_it_trains(monkeypatch, tmp_path):
    from adaptive_attn import train

    calls = []
    monkeypatch.setattr(train, "apply_training_settings", lambda: calls.append("settings"))
    monkeypatch.setattr(train, "_hydra_main", lambda: calls.append("train"))
    monkeypatch.setattr(sys, "argv", ["train", "experiment=quick", f"hydra.run.dir={tmp_path}"])
    train.main()
    assert calls == ["settings", "train"]


def test_the_device_names_the_cpu_model_from_proc_cpuinfo(monkeypatch, tmp_path):
    from adaptive_attn import process

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(cpuinfo if path == "/proc/cpuinfo" else path))
    assert process.cpu_model() == "AMD EPYC 9654 96-Core Processor"
    cpuinfo.write_text("processor\t: 0\n")  # no model name (some ARM kernels): the machine type instead
    assert process.cpu_model() == (platform.processor() or platform.machine())
