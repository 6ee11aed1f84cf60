"""A CSV logger that keeps what a run logged before it was resumed."""

import csv
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from adaptive_attn.data.atomic import write_atomically


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; this one appends to it, under its header."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))


class ResumableCSVLogger(CSVLogger):
    """`csv/metrics.csv` of a resumed run holds the rows from before the interruption and after it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def keep_rows_before(source: Path, step: int, target: Path) -> None:
    """Write the rows of the metrics.csv `source` logged before `step`, under its header, to `target` (which
    may be `source` itself)."""
    with source.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if row.get("step") and int(row["step"]) < step]
        fields = reader.fieldnames or []

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    write_atomically(target, write)  # a process killed while rewriting the log in place must not lose it
