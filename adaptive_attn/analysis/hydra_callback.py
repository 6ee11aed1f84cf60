"""Hydra callback: analyse a sweep directory when the sweep ends."""

import logging
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepAnalysis(Callback):
    """After every job of a sweep ran: results.csv, summary.md and plots; then a non-zero exit status if a
    job failed (its error is in its summary.json and in summary.md)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from adaptive_attn.analysis.results import analyse

        sweep_dir = config.hydra.sweep.dir
        try:
            runs = analyse(sweep_dir)
            log.info(f"sweep summary: {sweep_dir}/summary.md")
        except Exception as err:  # the runs' own results stay intact either way
            log.warning(f"sweep analysis failed: {err}")
            return
        failed = runs[runs["status"] != "ok"]
        if len(failed):
            print(
                f"error: {len(failed)} of {len(runs)} jobs did not finish (see {sweep_dir}/summary.md)", file=sys.stderr
            )
            raise SystemExit(1)
