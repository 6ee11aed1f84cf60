"""The benchmark scripts run end to end at tiny sizes and write the records their README tables come from."""

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptive_attn.ops import block_kernel

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = ["--batch", "1", "--heads", "2", "--head-dim", "8", "--d-model", "32", "--indexer-heads", "2"]
TINY += ["--indexer-dim", "8", "--repeats", "1"]


def run_script(name: str, *args: str) -> None:
    subprocess.run([sys.executable, str(BENCHMARKS / name), *args], check=True, capture_output=True, text=True)


def causal_pairs_share(seq_len: int, keys_of_query) -> float:
    """Share of the causal (query, key) pairs attended when query t attends keys_of_query(t) of them."""
    return sum(keys_of_query(t) for t in range(seq_len)) / (seq_len * (seq_len + 1) / 2)


def test_attention_benchmark_records(tmp_path):
    out = tmp_path / "attention.json"
    blocks = ["--block-size", "16", "--query-block", "16"]
    run_script("attention.py", "--lengths", "64", "--keeps", "0.25", "--ks", "16", *TINY, *blocks, "--json", str(out))
    records = json.loads(out.read_text())

    assert len(records) == 2 * 2 * 2  # modes x budgets x passes
    assert all(r["process"]["matmul_precision"] == "high" for r in records)  # the training process's settings
    for r in records:
        assert {"mode", "L", "columns", "pass", "ms", "dense_ms", "ratio_vs_dense", "device"} <= r.keys()
        assert r["ms"] > 0 and r["attention_ms"] > 0 and r["dense_ms"] > 0
        for part, ratio in (("ms", "ratio_vs_dense"), ("attention_ms", "attention_ratio_vs_dense")):
            # times and ratios are rounded to 0.001, which moves the quotient of two small times a lot
            rounding = r[ratio] * 0.0005 * (1 / r[part] + 1 / (r["dense_ms"] - 0.0005)) + 0.0005
            assert abs(r[ratio] - r[part] / r["dense_ms"]) <= rounding + 1e-9
        # keep 0.25 of 64 tokens and k = 16 are the same budget: 16 tokens, or the diagonal block alone
        assert r["columns"] == (16 if r["mode"] == "token" else 0)
        if r["mode"] == "token":  # each query attends min(k, t + 1) tokens
            expected = causal_pairs_share(64, lambda t: min(16, t + 1))
        else:  # k = 16 is the diagonal block alone: each query attends its own block up to itself
            expected = causal_pairs_share(64, lambda t: t % 16 + 1)
        assert abs(r["pairs_vs_dense"] - expected) < 1e-3
    assert {(r["mode"], r["pass"]) for r in records} == {(m, p) for m in ("token", "block") for p in ("fwd", "fwdbwd")}


def test_attention_forms_benchmark_counts_the_pairs_each_form_attends(tmp_path):
    out = tmp_path / "forms.json"
    run_script(
        "attention_forms.py",
        "--seq-len",
        "256",
        "--heads",
        "2",
        "--head-dim",
        "8",
        "--rope-dim",
        "8",
        "--kv-rank",
        "16",
        "--block-size",
        "16",
        "--query-block",
        "32",
        "--rows",
        "3",
        "--selected",
        "2",
        "--repeats",
        "1",
        "--json",
        str(out),
    )
    records = {r["form"]: r for r in json.loads(out.read_text())}

    forms = {f"{kind}, {form} form" for kind in ("dense causal", "block call") for form in ("per-head", "MQA")}
    extra = {"block call, per-head, expanded", "block call, per-head, no gather"}
    kernel = {"block call, MQA, cpu kernel"} if block_kernel.takes(torch.zeros(1)) else set()  # a C++ compiler
    assert set(records) == forms | extra | kernel
    for r in records.values():
        assert r["pairs"] == (
            2 * 256 * 257 // 2 if r["form"].startswith("dense") else 3 * 2 * (32 * 2 * 16 + 32 * 33 // 2)
        )
        # ms is rounded to 0.001, ns per pair to 0.0001
        assert abs(r["ns_per_pair"] - r["ms"] * 1e6 / r["pairs"]) <= 0.0005 * 1e6 / r["pairs"] + 1e-4
    baseline = records["dense causal, per-head form"]["ns_per_pair"]
    assert all(
        abs(r["per_pair_vs_dense"] - r["ns_per_pair"] / baseline) < 2e-3 * r["per_pair_vs_dense"] + 1e-3
        for r in records.values()
    )


def test_attention_backward_benchmark_checks_its_blas_backward_against_sdpa(tmp_path):
    out = tmp_path / "backward.json"
    shape = ["--seq-len", "256", "--heads", "2", "--rope-dim", "8", "--kv-rank", "16", "--block-size", "16"]
    shape += ["--query-block", "32", "--rows", "3", "--selected", "2", "--dtype", "float64"]
    # tiles of 24 of a row's 64 query rows: the last one shorter
    run_script("attention_backward.py", *shape, "--tile", "24", "--repeats", "1", "--json", str(out))
    records = {r["form"]: r for r in json.loads(out.read_text())}

    blas = {"BLAS backward, rows over threads", "BLAS backward, each row on all threads"}
    assert set(records) == blas | {"SDPA's fused backward", "its products alone, rows over threads"}
    for form in blas:  # the same gradients as SDPA's backward, in float64
        assert records[form]["max_grad_error"] < 1e-10
    assert records["its products alone, rows over threads"]["max_grad_error"] is None  # no gradient to compare
    base = records["SDPA's fused backward"]["ms"]
    for r in records.values():
        assert r["ms"] > 0 and abs(r["vs_sdpa"] - r["ms"] / base) <= 0.0005 * (1 + r["vs_sdpa"]) / base + 0.0005


def test_throughput_benchmark_records(tmp_path, monkeypatch):
    out = tmp_path / "throughput.json"
    run_script(
        "throughput.py",
        *("--models", "dense", "fixed25", "adaptive", "--seq-len", "128", "--batch", "2", "--repeats", "2"),
        "--warmup",
        "0",
        *("--calibrate", "1", "--breakdown", "--breakdown-rounds", "1", "--json", str(out)),
        *("--overrides", "experiment=quick", "model.sparse.block_size=8", "fixed25:model.sparse.query_block=16"),
    )
    records = json.loads(out.read_text())

    assert [r["model"] for r in records] == ["dense", "fixed25", "adaptive"]
    assert all(r["process"]["matmul_precision"] == "high" for r in records)  # the training process's settings
    dense, fixed, adaptive = records
    # dense has no model.sparse: the block override applied to fixed25 only, with its own query block
    assert "model.sparse.block_size=8" in fixed["overrides"] and fixed["pairs_share"] < 1 == dense["pairs_share"]
    for r, attention in ((dense, "dense_attention"), (fixed, "sparse_attention")):
        ms = r["breakdown_ms"]
        assert ms[attention] > 0 and ms["moe"] > 0 and ms["optimizer"] > 0
        parts = sum(v for k, v in ms.items() if k != "total")
        assert abs(parts - ms["total"]) < 1e-6 * ms["total"] + 0.05  # the parts add up to the step
    assert fixed["breakdown_ms"]["indexer"] > 0 and dense["breakdown_ms"]["indexer"] == 0
    assert 0 < dense["attention_share"] < 1 and fixed["amdahl_floor"] <= fixed["amdahl_bound"] + 1
    assert dense["equivalent_keep"] == 1.0 and abs(fixed["equivalent_keep"] - 0.25) < 1e-6
    assert dense["ratio_vs_baseline"] == 1.0 and dense["ratio_interval"] == [1.0, 1.0]
    # ratios pair the models round by round: the median of the per-round ratios (the upper of two), and with
    # two rounds their whole range as the 95% interval
    vs_fixed = adaptive["vs_fixed"]
    for ratio, interval, r, base in (
        (fixed["ratio_vs_baseline"], fixed["ratio_interval"], fixed, dense),
        (vs_fixed["ratio"], vs_fixed["interval"], adaptive, fixed),
    ):
        low, high = sorted(a / b for a, b in zip(r["round_ms"], base["round_ms"], strict=True))  # of rounded ms
        assert ratio == interval[1] and ratio == pytest.approx(high, abs=2e-3)
        assert interval[0] == pytest.approx(low, abs=2e-3) and interval[0] <= interval[1]
    assert vs_fixed["model"] == "fixed25" and "vs_fixed" not in fixed
    tokens_per_s = 2 * 128 / fixed["step_ms"] * 1000
    assert fixed["step_ms"] > 0 and abs(fixed["tokens_per_s"] - tokens_per_s) < 0.01 * tokens_per_s

    # the figure of these records: each bar stacks the model's whole profiled step, labelled with its ratios
    figure = tmp_path / "speed.png"
    run_script("plot_speed.py", str(out), str(out), "--out", str(figure))
    assert figure.read_bytes().startswith(b"\x89PNG")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from plot_speed import panel

    drawn = panel(out)
    assert "block_size=8" in drawn["title"] and "query_block=16" in drawn["title"]
    for bar, r in zip(drawn["bars"], records, strict=True):
        assert sum(bar["ms"].values()) == pytest.approx(r["breakdown_ms"]["total"], abs=0.05)
    assert drawn["bars"][2]["label"].startswith(f"{adaptive['ratio_vs_baseline']:.2f}x dense [")
    assert drawn["bars"][2]["label"].endswith(f"; {vs_fixed['ratio']:.2f}x fixed25")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="switches glibc's malloc policy")
def test_host_memory_benchmark_records(tmp_path):
    out = tmp_path / "host_memory.json"
    run_script(
        "host_memory.py",
        *("--models", "dense", "fixed25", "--seq-len", "32", "--batch", "2", "--repeats", "3", "--warmup", "0"),
        *("--calibrate", "0", "--overrides", "experiment=quick", "--json", str(out)),
    )
    records = json.loads(out.read_text())
    assert [r["model"] for r in records] == ["dense", "fixed25"]
    # set_flush_denormal returns whether this CPU can flush (False leaves this process at its default)
    assert all(r["process"]["flush_denormal"] == torch.set_flush_denormal(False) for r in records)
    for r in records:
        assert len(r["glibc_round_ms"]) == len(r["kept_round_ms"]) == 3 and r["glibc_ms"] > 0 and r["kept_ms"] > 0
        # the median of the per-round ratios, within the rounding of the times
        ratios = sorted(k / g for k, g in zip(r["kept_round_ms"], r["glibc_round_ms"]))
        assert r["ratio"] == pytest.approx(ratios[1], abs=2e-3)
        assert r["interval"] == pytest.approx([ratios[0], ratios[2]], abs=2e-3)  # under 6 rounds: the whole range


def test_throughput_benchmark_times_the_warm_up_stage(tmp_path):
    """`--stage warmup`: sparse models attend densely and train the indexer on whole rows; no Amdahl bound."""
    out = tmp_path / "throughput.json"
    run_script(
        "throughput.py",
        *("--models", "dense", "fixed25", "--seq-len", "64", "--batch", "2", "--repeats", "1", "--warmup", "0"),
        *("--stage", "warmup", "--breakdown", "--breakdown-rounds", "1", "--json", str(out)),
        *("--overrides", "experiment=quick"),
    )
    dense, fixed = json.loads(out.read_text())
    assert fixed["stage"] == "warmup" and fixed["pairs_share"] == 1.0 and fixed["equivalent_keep"] == 1.0
    assert fixed["dtype"] == "float32" and fixed["device"].startswith("cpu")
    ms = fixed["breakdown_ms"]
    # attention is dense and the indexer trains; nothing picks keys yet (no budget, no top-k)
    assert ms["dense_attention"] > 0 and ms["indexer"] > 0 and ms["indexer_kl"] > 0
    assert ms["budget"] == 0 and ms["selection"] == 0
    assert "amdahl_bound" not in fixed and "attention_share" not in dense


def test_throughput_benchmark_times_mixed_precision_as_training_runs_it(tmp_path):
    """`--dtype bfloat16` times steps under autocast (the path `gpu_check.sh` takes on a GPU, here on the CPU):
    both models step, the sparse one at its keep; `--breakdown` is refused off the CPU."""
    out = tmp_path / "throughput.json"
    args = ("--models", "dense", "fixed25", "--seq-len", "64", "--batch", "2", "--repeats", "1", "--warmup", "0")
    run_script("throughput.py", *args, "--dtype", "bfloat16", "--overrides", "experiment=quick", "--json", str(out))
    dense, fixed = json.loads(out.read_text())
    assert dense["dtype"] == fixed["dtype"] == "bfloat16" and fixed["step_ms"] > 0 and fixed["equivalent_keep"] == 0.25
    refused = subprocess.run(
        [sys.executable, str(BENCHMARKS / "throughput.py"), "--device", "cuda", "--breakdown"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "--breakdown profiles CPU time" in refused.stderr


def test_attention_benchmark_records_a_failing_configuration_and_goes_on(tmp_path):
    """FlexAttention has no backward on the CPU: its fwd+bwd rows record the error, the fwd rows their times."""
    out = tmp_path / "attention.json"
    run_script(
        "attention.py",
        *("--modes", "block", "--backend", "flex", "--lengths", "64", "--keeps", "0.5", "--ks", *TINY),
        *("--block-size", "16", "--query-block", "32", "--json", str(out)),
    )
    fwd, fwdbwd = json.loads(out.read_text())
    assert fwd["pass"] == "fwd" and fwd["ms"] > 0 and "error" not in fwd
    assert fwdbwd["pass"] == "fwdbwd" and "backward" in fwdbwd["error"] and "ms" not in fwdbwd


def test_turns_alternate_their_order_and_keep_each_callables_results(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from timing import take_turns

    calls = []
    fns = [lambda name=name: calls.append(name) or f"{name}{len(calls)}" for name in "abc"]
    results = take_turns(fns, repeats=3, warmup=1)
    assert "".join(calls) == "abccbaabccba"
    assert results == [["a6", "a7", "a12"], ["b5", "b8", "b11"], ["c4", "c9", "c10"]]


def test_median_interval_covers_the_median_as_often_as_it_claims(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from timing import median_interval

    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)  # under 6 values: the whole range
    assert median_interval([float(v) for v in range(9, 0, -1)]) == (2.0, 8.0)  # x_(2), x_(8): 96.1%
    generator = torch.Generator().manual_seed(0)
    true_median = math.log(2)  # of the exponential distribution, skewed as step times are
    for n, coverage in ((9, 1 - 2 * 10 / 2**9), (15, 1 - 2 * 576 / 2**15)):  # P(Binomial(n, 1/2) < j)
        draws = torch.empty(4000, n).exponential_(generator=generator).tolist()
        covered = [low <= true_median <= high for low, high in map(median_interval, draws)]
        assert abs(sum(covered) / len(covered) - coverage) < 0.015, n


def test_throughput_overrides_reach_every_model_that_has_the_key_null_valued_or_not(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from throughput import model_overrides

    overrides = ["data=text", "model.sparse.block_size=64", "model.sparse.query_block=128"]
    # model.sparse.query_block is null in the sparse models' config (it then follows block_size)
    assert model_overrides("fixed25", overrides) == overrides
    assert model_overrides("dense", overrides) == ["data=text"]  # dense has no model.sparse
    assert model_overrides("dense", ["fixed25:model.sparse.query_block=16"]) == []
    assert model_overrides("fixed25", ["fixed25:model.sparse.query_block=16"]) == ["model.sparse.query_block=16"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.sparse.blok_size=8", "no model of --models dense fixed25 has the key model.sparse.blok_size"),
        ("fixed50:model.sparse.block_size=8", "fixed50 is not one of --models dense fixed25"),
    ],
)
def test_throughput_benchmark_rejects_an_override_that_reaches_no_model_before_any_work(override, message):
    args = ["--models", "dense", "fixed25", "--seq-len", "64", "--batch", "1", "--repeats", "1"]
    script = str(BENCHMARKS / "throughput.py")
    done = subprocess.run([sys.executable, script, *args, "--overrides", override], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"--overrides: {message}"]
