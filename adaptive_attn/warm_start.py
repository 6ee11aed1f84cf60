"""Warm start: a sparse arm begins where a sibling's dense warm-up ended, instead of repeating it.

Through the dense warm-up every sparse arm of a seed trains the same weights, bit for bit (a test holds
it): attention is dense, the indexer learns from whole rows, and a budget's own parameters (an adaptive
controller) get no gradient. So one run's warm-up can serve them all. Each sparse run saves
`checkpoints/warmup_end.ckpt` when its warm-up ends (`WarmupEndCheckpoint`); a run with
`warm_start=<that file>`, or `warm_start=<model>` for the sibling `<model>_L<seq_len>_s<seed>` next to
this run's directory, starts from it: the sibling's weights, optimizer state, schedule, data position
and logged rows, plus its own budget's parameters as its seed initialised them. The sibling must be this
run but for its budget (`model._target_`, `model.keep`, `model.budget.*`), checked before any work.
In token mode the arm then ends bit for bit where it would from scratch; in block mode, where query blocks
are drawn at random (`losses.draw_rows`), it goes on as a resumed run does: the same distribution, not the
same bits (random states are not saved).
"""

from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from adaptive_attn.config import ConfigError, is_dense
from adaptive_attn.data.atomic import write_atomically
from adaptive_attn.resume import RECORD, differences, keep_rows_before

FILE = "warmup_end.ckpt"
BUDGET_KEYS = ("model._target_", "model.keep", "model.budget")  # what may differ between warm-up siblings


class WarmupEndCheckpoint(L.Callback):
    """Saves `dirpath/warmup_end.ckpt` at the step a sparse model's dense warm-up ends, and again after a
    validation at that step, so that an arm started there has that point of the curve: listed after the
    convergence tracker, it saves that tracker's state with the point. (Not a Lightning `Checkpoint`, which
    runs last but is refused where `trainer.enable_checkpointing` is false, as in the exp3_cpu experiments.)"""

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / FILE

    def _save_at_warmup_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = pl_module.hparams.dense_warmup_steps
        if trainer.global_step == steps > 0 and any(True for _ in pl_module.model.sparse_layers()):
            trainer.save_checkpoint(self.path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        self._save_at_warmup_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save_at_warmup_end(trainer, pl_module)


def sibling_dir(out_dir: Path, model: str, cfg: DictConfig) -> Path:
    """The run of `model` at this length and seed in this run's sweep directory: `<model>_L<len>_s<seed>`
    (the exp3 experiments' names), or `<job number>_<model>_L<len>_s<seed>` (the default names)."""
    job = f"{model}_L{cfg.seq_len}_s{cfg.seed}"
    numbered = sorted(out_dir.parent.glob(f"[0-9]*_{job}"))
    return numbered[0] if numbered and not (out_dir.parent / job).exists() else out_dir.parent / job


def warm_start_source(cfg: DictConfig, out_dir: Path) -> tuple[Path, dict] | None:
    """cfg.warm_start (null, a checkpoint file, or a sibling model's name) -> the warm-up checkpoint to start
    from, and its contents (None for the sibling itself and for a dense model, which a sweep may hold too);
    ConfigError when it is not there, lies past the warm-up or comes from another run."""
    if cfg.get("warm_start") is None or is_dense(cfg):
        return None
    name = str(cfg.warm_start)
    path = Path(name) if name.endswith(".ckpt") else sibling_dir(out_dir, name, cfg) / "checkpoints" / FILE
    if path.absolute() == (out_dir / "checkpoints" / FILE).absolute():  # the sibling itself, in a sweep of both
        return None
    if not path.is_file():
        raise ConfigError(f"warm_start={name}: no file {path} (a sparse run saves it when its dense warm-up ends)")
    record = path.parent.parent / RECORD
    if not record.is_file():
        raise ConfigError(f"warm_start={name}: no {RECORD} in {path.parent.parent} to check that it is a sibling")
    differ = differences(cfg, path.parent.parent, may_differ=BUDGET_KEYS)
    if differ:
        raise ConfigError(f"warm_start={name}: {path.parent.parent} is another run, not only another budget: {differ}")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if any("param_names" not in group for group in saved["optimizer_states"][0]["param_groups"]):
        raise ConfigError(
            f"warm_start={name}: {path} names no parameters in its optimizer state (saved before warm starts)"
        )
    if saved["global_step"] > cfg.module.dense_warmup_steps:
        raise ConfigError(
            f"warm_start={name}: {path} is at step {saved['global_step']}, past module.dense_warmup_steps="
            f"{cfg.module.dense_warmup_steps}"
        )
    return path, saved


def branched_optimizer(saved: dict, groups: list[dict]) -> dict:
    """A saved AdamW state (its groups with `param_names`) -> the state for `groups` (optimizer_groups): each
    named parameter keeps its saved moments; parameters the saved run lacks start without any, in groups
    of their own rate at the schedule's current factor."""
    by_name = {n: (g, i) for g in saved["param_groups"] for n, i in zip(g["param_names"], g["params"])}
    first = saved["param_groups"][0]
    factor = first["lr"] / first["initial_lr"]  # the schedule's value at the branch step, the same for all groups
    state, param_groups, index = {}, [], 0
    for group in groups:
        names = [name for name, _ in group["params"]]
        known = next((by_name[n][0] for n in names if n in by_name), None)
        hyper = {k: v for k, v in (known or first).items() if k not in ("params", "param_names")}
        if known is None:  # a group the saved run does not have: its own rate
            hyper.update(weight_decay=group["weight_decay"], initial_lr=group["lr"], lr=group["lr"] * factor)
        for name in names:
            if name in by_name:
                state[index] = saved["state"][by_name[name][1]]
            index += 1
        param_groups.append({**hyper, "param_names": names, "params": list(range(index - len(names), index))})
    return {"state": state, "param_groups": param_groups}


def branched_scheduler(saved: dict, param_groups: list[dict]) -> dict:
    """A saved LambdaLR state -> the same schedule over `param_groups`."""
    return {
        **saved,
        "base_lrs": [g["initial_lr"] for g in param_groups],
        "_last_lr": [g["lr"] for g in param_groups],
        "lr_lambdas": [None] * len(param_groups),
    }


def copy_logged_rows(source: tuple[Path, dict], out_dir: Path) -> None:
    """The sibling's csv/metrics.csv rows of the steps before the branch, as this run's first rows (before
    its logger starts, which then appends under their header)."""
    path, saved = source
    sibling_log, log = path.parent.parent / "csv" / "metrics.csv", out_dir / "csv" / "metrics.csv"
    if sibling_log.is_file() and not log.exists():
        keep_rows_before(sibling_log, saved["global_step"], log)


def branch(source: tuple[Path, dict], module: L.LightningModule, out_dir: Path) -> tuple[str, dict]:
    """The sibling's warm-up checkpoint (warm_start_source) -> (this run's checkpoint to resume from, what its
    summary records): the sibling's weights with this model's own parameters added, its optimizer state
    matched by name, the rest of its training state as it was (its checkpoint callback's aside)."""
    path, saved = source
    own = module.state_dict()
    foreign = [k for k, v in saved["state_dict"].items() if k not in own or own[k].shape != v.shape]
    if foreign:
        raise ConfigError(f"warm_start: {path} holds weights this model lacks or shapes differently: {foreign[:3]}")
    optimizer = branched_optimizer(saved["optimizer_states"][0], module.optimizer_groups())
    branched = {
        **saved,
        "state_dict": {**own, **saved["state_dict"]},
        "optimizer_states": [optimizer],
        "lr_schedulers": [branched_scheduler(saved["lr_schedulers"][0], optimizer["param_groups"])],
        "hyper_parameters": dict(module.hparams),
        "callbacks": {k: v for k, v in saved.get("callbacks", {}).items() if not k.startswith("ModelCheckpoint")},
    }
    target = out_dir / "checkpoints" / "warm_start.ckpt"
    write_atomically(target, lambda tmp: torch.save(branched, tmp))
    own_only = sorted(set(own) - set(saved["state_dict"]))
    return str(target), {"checkpoint": str(path), "steps": int(saved["global_step"]), "own_parameters": own_only}
