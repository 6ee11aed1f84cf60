"""Where each adaptive run gives its keys: per-run k by difficulty, against the fixed pair of its data,
length and seed."""

import math

import pandas as pd
import pytest

from adaptive_attn.analysis.policy import policy_tables


def run(tmp_path, model, seed, data="votes", k_rows=None, **metrics):
    run_dir = tmp_path / f"{data}_{model}_s{seed}"
    run_dir.mkdir()
    if k_rows is not None:
        pd.DataFrame(k_rows).to_csv(run_dir / "k_vs_difficulty.csv", index=False)
    keep = {"keep": 0.1} if model.startswith("fixed") else {"target": 0.1} if model != "dense" else {}
    return dict(status="ok", data=data, seq_len=256, seed=seed, model=model, run_dir=str(run_dir), **keep, **metrics)


def votes_k(difficulties, ks):
    return [{"task": "votes", "difficulty": d, "k": k} for d, k in zip(difficulties, ks)]


def slices(alphabet2, alphabet32):
    return {"val_acc/votes/alphabet2": alphabet2, "val_acc/votes/alphabet32": alphabet32}


def test_each_adaptive_run_is_read_against_the_fixed_run_of_its_data_length_and_seed(tmp_path):
    runs = pd.DataFrame(
        [
            run(
                tmp_path,
                "adaptive10",
                0,
                k_rows=votes_k([2, 2, 8, 32], [10, 12, 6, 3]),
                val_acc=0.6,
                **slices(0.7, 0.5),
            ),
            run(tmp_path, "fixed10", 0, k_rows=votes_k([2, 32], [26, 26]), val_acc=0.5, **slices(0.4, 0.6)),
            run(tmp_path, "adaptive10", 1, k_rows=votes_k([2, 32], [5, 9]), val_acc=0.6),
            run(tmp_path, "fixed10", 1, data="counting", val_acc=0.9),  # another data set: not its pair
            run(tmp_path, "shuffled10", 0, k_rows=votes_k([2, 32], [7, 7]), val_acc=0.55),
            run(tmp_path, "adaptive10", 0, data="text_domains", k_rows=[{"task": "text", "domain": "code", "k": 4}]),
            run(tmp_path, "dense", 0, val_acc=0.9),
        ]
    )
    table = policy_tables(runs)["votes"].set_index(["model", "seed"])
    assert list(table.index) == [("adaptive10", 0), ("adaptive10", 1), ("shuffled10", 0)]  # no fixed, dense, text
    first = table.loc[("adaptive10", 0)]
    # ranks of difficulty (1.5, 1.5, 3, 4) against those of k (3, 4, 2, 1): rho = -4.5 / sqrt(4.5 * 5)
    assert first["rho"] == pytest.approx(round(-4.5 / math.sqrt(22.5), 3))
    assert (first["k votes/alphabet2"], first["k votes/alphabet32"]) == (11, 3)
    assert first["val_acc - fixed"] == pytest.approx(0.1)
    assert first["val_acc/votes/alphabet2 - fixed"] == pytest.approx(0.3)
    assert first["val_acc/votes/alphabet32 - fixed"] == pytest.approx(-0.1)
    assert table.loc[("adaptive10", 1), "rho"] == 1.0 and math.isnan(table.loc[("adaptive10", 1), "val_acc - fixed"])
    assert table.loc[("shuffled10", 0), "val_acc - fixed"] == pytest.approx(0.05)  # its target's fixed budget
    assert math.isnan(table.loc[("shuffled10", 0), "rho"])  # one k for every sequence: no rank order


def test_runs_without_a_recorded_k_give_no_table(tmp_path):
    runs = pd.DataFrame([run(tmp_path, "adaptive10", 0, val_acc=0.6), run(tmp_path, "fixed10", 0, val_acc=0.5)])
    assert policy_tables(runs) == {}
