"""Runs that are stopped (SIGTERM from a cluster's time limit or preemption, SIGINT from a user) stop at the
end of the current training step, leave a checkpoint to resume from, and say so."""

import signal

import lightning as L


class RunInterrupted(Exception):
    """A run stopped by a signal after saving its checkpoint; `signum` is the signal."""

    def __init__(self, signum: int, checkpoint: str):
        self.signum, self.checkpoint = signum, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at a step boundary; resume from {checkpoint}")


class GracefulInterrupt(L.Callback):
    """On SIGTERM or SIGINT during fit: finish the step, save `checkpoint` (the file `ckpt_path=last`
    resumes from, written where a periodic checkpoint would be), let the step's metrics reach the loggers,
    then raise RunInterrupted before the next step (or once fit returns: `raise_if_stopped`). A second
    signal interrupts at once."""

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint
        self.received: int | None = None
        self.saved = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.received = signum

    def on_train_start(self, trainer, pl_module):
        # after Lightning installed its own SIGTERM handler (which would end the fit with exit status 0)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.received is not None and not self.saved:
            trainer.save_checkpoint(self.checkpoint)
            self.saved = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.raise_if_stopped(trainer)

    def raise_if_stopped(self, trainer) -> None:
        if not self.saved:
            return
        for logger in trainer.loggers:
            logger.finalize("interrupted")
        raise RunInterrupted(self.received, self.checkpoint)

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
