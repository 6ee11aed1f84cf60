"""The study's grid scripts, run with a stand-in `python` that only records each sweep it is given: the warm-start
variant schedules the very jobs of `run.sh`, and in each (data, length, seed) the run whose warm-up the
others take comes first."""

import itertools
import os
import subprocess
from pathlib import Path

import pytest

STUDY = Path(__file__).parent.parent / "results" / "exp3_cpu"
RECORDER = '#!/bin/bash\necho "$@" >> "$SWEEPS"\n'


def sweeps(script: str, tmp_path: Path) -> list[dict[str, str]]:
    """The overrides of every sweep the script starts, as {key: value} (comma lists unexpanded)."""
    bin_dir, log = tmp_path / "bin", tmp_path / f"{script}.sweeps"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    (bin_dir / "python").write_text(RECORDER)
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SWEEPS": str(log), "OUT": str(tmp_path / "out")}
    subprocess.run(["bash", str(STUDY / script)], env=env, check=True, timeout=60)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert all(line[:3] == ["-m", "adaptive_attn.train", "-m"] for line in lines)
    return [dict(arg.split("=", 1) for arg in line[3:]) for line in lines]


def jobs(sweep: dict[str, str]) -> list[tuple]:
    """(experiment, length, seed, model, sweep dir's last part) of each job of one sweep."""
    lists = [sweep[key].split(",") for key in ("experiment", "seq_len", "seed", "model")]
    return [(*job, Path(sweep["hydra.sweep.dir"]).name) for job in itertools.product(*lists)]


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    return {script: sweeps(script, tmp_path) for script in ("run.sh", "run_warm_start.sh")}


def test_the_warm_start_grid_runs_the_jobs_of_run_sh_once_each(scheduled):
    planned = [job for sweep in scheduled["run.sh"] for job in jobs(sweep)]
    warm = [job for sweep in scheduled["run_warm_start.sh"] for job in jobs(sweep)]
    assert len(planned) == len(set(planned)) == 157
    assert sorted(warm) == sorted(planned)


def test_each_group_starts_with_the_run_whose_warm_up_the_others_take(scheduled):
    for sweep in scheduled["run_warm_start.sh"]:
        assert "," not in sweep["seq_len"] + sweep["seed"]  # one (length, seed) per sweep: its own warm-up
        assert sweep["model"].split(",")[0] == sweep["warm_start"]
