"""Hydra callback: analyse a sweep directory when the sweep ends."""

import logging

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepAnalysis(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from adaptive_attn.analysis.results import analyse

        sweep_dir = config.hydra.sweep.dir
        try:
            analyse(sweep_dir)
            log.info(f"sweep summary: {sweep_dir}/summary.md")
        except Exception as err:  # the runs' own results stay intact either way
            log.warning(f"sweep analysis failed: {err}")
