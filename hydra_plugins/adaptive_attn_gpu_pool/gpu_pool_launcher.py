"""Hydra launcher that runs a sweep over the GPUs of one machine: one job per GPU at a time.

Built on hydra-submitit-launcher's local executor, so every job is a fresh Python process whose
CUDA_VISIBLE_DEVICES is set before it starts. GPUs come from a pool: a job takes a free GPU and gives it
back when it ends, so two jobs never share a GPU, whatever their lengths (a fixed `job_num % n_gpus`
would double-book a GPU as soon as jobs finish out of order). Selected with `hydra/launcher=gpu_pool`.
"""

import copy
import logging
import queue
import threading
from collections.abc import Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

log = logging.getLogger(__name__)


def visible_gpu_count() -> int:
    """GPUs on this machine, counted without initialising CUDA in the launcher process."""
    import torch

    return torch.cuda.device_count()


class GpuPoolLauncher(LocalLauncher):
    def __init__(self, n_gpus: int | None = None, **params):
        super().__init__(**params)
        self.n_gpus = n_gpus if n_gpus is not None else visible_gpu_count()

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        n_workers = max(1, self.n_gpus)
        free_gpus: queue.Queue[int] = queue.Queue()
        for gpu in range(n_workers):
            free_gpus.put(gpu)
        results: list[JobReturn | None] = [None] * len(job_overrides)
        log.info(f"GPU pool: {len(job_overrides)} jobs over {n_workers} {'GPUs' if self.n_gpus else 'CPU slot'}")

        def run_one(i: int, overrides: Sequence[str]) -> None:
            gpu = free_gpus.get()
            try:
                worker = copy.copy(self)
                # the executor's setup commands run in the job's shell before Python starts
                setup = [*self.params.get("setup", []), f"export CUDA_VISIBLE_DEVICES={gpu}"] if self.n_gpus else None
                worker.params = {**self.params, **({"setup": setup} if setup else {})}
                results[i] = LocalLauncher.launch(worker, [overrides], initial_job_idx + i)[0]
            except Exception as err:  # a job that fails outside its task function: record, keep going
                ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
                ret._return_value = err
                results[i] = ret
            finally:
                free_gpus.put(gpu)

        threads = [threading.Thread(target=run_one, args=(i, ov)) for i, ov in enumerate(job_overrides)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results
