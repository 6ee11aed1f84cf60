"""README's Findings table is computed from the committed results; the computation on a hand-made case."""

from pathlib import Path

import pandas as pd
import pytest

from adaptive_attn.analysis.findings import README_END, README_START, findings, write_into_readme
from adaptive_attn.analysis.results import equal_compute_pairs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "exp3_cpu" / "results.csv"


def test_readme_findings_are_recomputed_from_the_committed_results():
    table = findings(pd.read_csv(RESULTS)).to_markdown(index=False)
    assert table in (ROOT / "README.md").read_text(), "README's Findings table differs from results/exp3_cpu"


def test_findings_pair_runs_by_seed():
    rows = []
    for seed, (adaptive, fixed, dense) in enumerate([(0.8, 0.6, 0.9), (0.7, 0.6, 0.9), (0.9, 0.6, 0.9)]):
        for model, acc, ms in (("adaptive10", adaptive, 110.0), ("fixed10", fixed, 100.0), ("dense", dense, 80.0)):
            rows.append(dict(status="ok", data="counting", seq_len=64, seed=seed, model=model, val_acc=acc, step_ms=ms))
    table = findings(pd.DataFrame(rows)).set_index(["comparison", "metric"])["mean ± 95% CI"]
    # differences 0.2, 0.1, 0.3: mean 0.2, sd 0.1, t(2) = 4.303 -> CI 0.248
    assert table[("adaptive10 - fixed10", "val_acc")] == "0.200 ± 0.248 (n=3)"
    assert table[("adaptive10 / fixed10", "step_ms")] == "1.100 ± 0.000 (n=3)"
    assert table[("fixed10 / dense", "step_ms")] == "1.250 ± 0.000 (n=3)"
    assert ("adaptive10 - shuffled10", "val_acc") not in table  # no shuffled runs: no row


@pytest.mark.parametrize("column", ["val_loss"])
def test_text_runs_are_compared_on_loss(column):
    rows = [
        dict(status="ok", data="text_domains", seq_len=512, seed=s, model=m, val_loss=v)
        for s in (0, 1)
        for m, v in (("adaptive10", 2.0 + s), ("fixed10", 2.5 + s))
    ]
    table = findings(pd.DataFrame(rows))
    assert list(table["metric"]) == [column] and table["mean ± 95% CI"].iloc[0].startswith("-0.500 ± 0.000")


def test_the_table_is_written_between_the_readme_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# before\n{README_START}old table{README_END}\nafter\n")
    write_into_readme("| new |", readme)
    assert readme.read_text() == f"# before\n{README_START}| new |{README_END}\nafter\n"
    readme.write_text("no markers")
    with pytest.raises(SystemExit, match="no findings markers"):
        write_into_readme("| new |", readme)


def test_k_against_text_content_is_the_ratio_of_domain_means_per_run():
    rows = [
        dict(
            status="ok",
            data="text_domains",
            seq_len=512,
            seed=s,
            model=m,
            k_mean_domain_repetitive=r,
            k_mean_domain_prose=p,
        )
        for s, (r, p) in enumerate([(2.0, 4.0), (3.0, 4.0)])
        for m in ("adaptive10", "fixed10")
    ]
    table = findings(pd.DataFrame(rows)).set_index(["question", "comparison"])["mean ± 95% CI"]
    # ratios 0.5 and 0.75: mean 0.625, sd 0.177, t(1) = 12.706 -> CI 1.588; a fixed k does not adapt: no row
    assert table[("k adapts to content", "adaptive10")] == "0.625 ± 1.588 (n=2)"
    assert ("k adapts to content", "fixed10") not in table


def test_quality_is_also_pooled_over_lengths_by_length_and_seed():
    rows = [
        dict(
            status="ok",
            data="counting",
            seq_len=L,
            seed=s,
            model=m,
            val_acc=acc + (0.1 * s if m == "adaptive10" else 0),
        )
        for L in (64, 128)
        for s in (0, 1)
        for m, acc in (("adaptive10", 0.5), ("fixed10", 0.4), ("dense", 0.9))
    ]
    table = findings(pd.DataFrame(rows)).set_index(["L", "comparison", "metric"])["mean ± 95% CI"]
    # per length: differences 0.1 and 0.2; over both lengths 0.1, 0.2, 0.1, 0.2: sd 0.0577, t(3) = 3.182
    assert table[(64, "adaptive10 - fixed10", "val_acc")] == "0.150 ± 0.635 (n=2)"
    assert table[("all", "adaptive10 - fixed10", "val_acc")] == "0.150 ± 0.092 (n=4)"
    assert ("all", "fixed10 - dense", "val_acc") not in table  # pooled only for the comparisons of adaptive budgets


@pytest.mark.parametrize("data", ["counting", "votes"])
def test_slices_and_k_rows_are_read_from_each_synthetic_tasks_own_columns(data):
    """Counting's and votes' alphabet slices and k-difficulty correlations never mix."""
    rows = [
        {
            "status": "ok",
            "data": data,
            "seq_len": 256,
            "seed": s,
            "model": m,
            f"val_acc/{data}/alphabet2": acc + 0.1 * s,
            f"k_difficulty_spearman_{data}": -0.5 if m == "adaptive10" else None,
            "val_acc/counting/alphabet4": 0.0,  # another task's column, empty for votes in a joint results.csv
        }
        for s in (0, 1)
        for m, acc in (("fixed10", 0.5), ("dense", 0.8))
    ] + [{"status": "ok", "data": data, "seq_len": 256, "seed": 0, "model": "adaptive10"}]
    rows[-1][f"k_difficulty_spearman_{data}"] = -0.5
    table = findings(pd.DataFrame(rows)).set_index(["question", "metric"])["mean ± 95% CI"]
    assert table[("the budget binds: alphabet 2", f"val_acc/{data}/alphabet2")] == "-0.300 ± 0.000 (n=2)"
    assert table[("k adapts to difficulty", f"k_difficulty_spearman_{data}")] == "-0.500 (n=1)"
    assert (data == "counting") == (("the budget binds: alphabet 4", "val_acc/counting/alphabet4") in table)


def test_each_shuffled_control_is_paired_with_the_adaptive_budget_it_shuffles():
    keeps = {"fixed10": 0.1, "fixed25": 0.25}
    targets = {"adaptive": 0.25, "adaptive10": 0.1, "adaptive10_lr30": 0.1, "shuffled10": 0.1, "shuffled10_lr30": 0.1}
    targets["shuffled"] = 0.25
    rows = [dict(status="ok", model=m, keep=k) for m, k in keeps.items()]
    rows += [dict(status="ok", model=m, target=t) for m, t in targets.items()]
    pairs = equal_compute_pairs(pd.DataFrame(rows))
    shuffled = {model: baseline for model, baseline in pairs if baseline.startswith("adaptive")}
    assert shuffled == {"shuffled": "adaptive", "shuffled10": "adaptive10", "shuffled10_lr30": "adaptive10_lr30"}
    assert ("shuffled10_lr30", "fixed10") in pairs and ("adaptive10_lr30", "fixed10") in pairs
