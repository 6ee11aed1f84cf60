"""README's model-level speed table is read from the committed benchmark records (`results/throughput_cpu_*.json`)."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPARSE_ONLY = ("indexer", "budget", "selection", "indexer_kl")


def record_file(label: str) -> Path:
    """A row's label (its first cell) -> the benchmark record it comes from."""
    length = re.search(r"L=(\d+)", label).group(1)
    if "vote share" in label:
        name = f"votes_L{length}"
    elif "token mode" in label:
        name = f"token_L{length}"
    else:
        name = re.match(r"\w+", label).group() + f"_L{length}"  # research, default
    return ROOT / "results" / f"throughput_cpu_{name}.json"


def table_rows() -> list[list[str]]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model, length, batch |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().replace("**", "") for cell in line.strip("|").split("|")])
    return rows


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+\.\d+|\d+", cell)]


def expected_cells(records: list[dict]) -> list[list[float]]:
    """The numbers of a row's cells after its label, as the README rounds them."""
    dense, fixed = records[0], records[1]
    adaptive = next(r for r in records if "vs_fixed" in r)
    ms = fixed["breakdown_ms"]
    return [
        [round(dense["step_ms"])],
        [round(dense["attention_share"], 2)],
        [round(x, 2) for x in (fixed["ratio_vs_baseline"], *fixed["ratio_interval"])],
        [round(fixed["amdahl_bound"], 2), round(fixed["amdahl_floor"], 2)],
        [round(x, 2) for x in (adaptive["vs_fixed"]["ratio"], *adaptive["vs_fixed"]["interval"])],
        [round(100 * sum(ms[c] for c in SPARSE_ONLY) / ms["total"])],
    ]


@pytest.mark.parametrize("row", table_rows(), ids=lambda row: row[0])
def test_readme_speed_table_row_is_read_from_its_record(row):
    path = record_file(row[0])
    records = json.loads(path.read_text())
    assert all(str(r["seq_len"]) in row[0] for r in records), f"{path.name} does not hold {row[0]}"
    got = [numbers(cell) for cell in row[1:]]
    want = expected_cells(records)
    for cell, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == pytest.approx(w, abs=0.0051), f"{path.name}: column {cell + 2} reads {g}, the record {w}"


def test_each_row_has_its_own_record():
    rows = table_rows()
    assert rows and len({record_file(row[0]) for row in rows}) == len(rows)


def cpu_backend_rows() -> list[tuple[str, str, list[str]]]:
    """The table of README's `cpu` backend paragraph -> (label, threads, the cells after them) per row; a
    row with an empty label continues the one above."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("**The `cpu` backend"))
    start = next(i for i in range(start, len(lines)) if lines[i].startswith("| model, length, batch | threads |"))
    rows, label = [], None
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip().replace("**", "") for cell in line.strip("|").split("|")]
        label = cells[0] or label
        rows.append((label, cells[1], cells[2:]))
    return rows


@pytest.mark.parametrize("label,threads,cells", cpu_backend_rows(), ids=lambda x: x if isinstance(x, str) else "")
def test_readme_cpu_backend_table_row_is_read_from_its_record(label, threads, cells):
    path = ROOT / "results" / "cpu_epyc_avx2" / f"threads{threads}_kernel" / record_file(label).name
    records = json.loads(path.read_text())
    assert all(str(r["seq_len"]) in label and r["threads"] == int(threads) for r in records), path
    for cell, (g, w) in enumerate(zip([numbers(c) for c in cells], expected_cells(records), strict=True)):
        assert g == pytest.approx(w, abs=0.0051), f"{path}: column {cell + 3} reads {g}, the record {w}"
