"""Training entry point: compose config -> validate -> (runner) instantiate -> fit -> test -> summary.json.

    GOMP_SPINCOUNT=0 python -m adaptive_attn.train [model=fixed25] [data=mqar] [seq_len=512] [seed=1] ...
    GOMP_SPINCOUNT=0 python -m adaptive_attn.train -m model=adaptive,fixed25,fixed50 seq_len=64,128 seed=0,1,2

(GOMP_SPINCOUNT=0 stops idle OpenMP threads from spinning; on small CPUs it doubles throughput. The entry
point itself applies the process's settings, `adaptive_attn.process`: float32 matmuls at "high", subnormals
flushed, freed host memory kept in malloc's heap.)
"""

import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from adaptive_attn.config import CONF_DIR, ConfigError, check_group_overrides, fail
from adaptive_attn.process import apply_training_settings
from adaptive_attn.resume import checked_resume


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    # Lightning loads only now, after the config passed its checks (a rejected run answers in seconds)
    from lightning.pytorch.utilities import rank_zero_only

    from adaptive_attn.lit.interrupt import RunInterrupted
    from adaptive_attn.runner import run

    try:
        summary = run(cfg)
    except RunInterrupted as stop:  # a signal stops the whole sweep too: the same command finishes it later
        print(f"interrupted: {stop}", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except Exception as err:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # in a sweep one failing job must not stop the others: it is recorded as failed in its summary.json
        print(f"job failed ({type(err).__name__}: {err}); recorded in {cfg.output_dir}/summary.json", file=sys.stderr)
        return
    if rank_zero_only.rank == 0:
        untrained = summary.get("untrained_val_loss")
        before = f" (untrained {untrained:.4f})" if untrained is not None else ""
        print(
            f"done: val_loss={summary['val_loss']:.4f}{before} "
            f"tokens/s={summary.get('tokens_per_s', 0):.0f} -> {cfg.output_dir}/summary.json"
        )


def precheck(argv: list[str]) -> None:
    """A single run's config, composed as Hydra will compose it, checked before Hydra starts the job and
    creates its directory: a rejected run (a bad value, a checkpoint that is not there, a resume with
    another config) leaves nothing behind and touches no earlier run."""
    if any(a.startswith("-") for a in argv):  # multirun (each job checks itself) or a Hydra flag
        return
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=argv, return_hydra_config=True)
    OmegaConf.set_struct(cfg, False)
    HydraConfig.instance().set_config(cfg)  # hydra.run.dir reads ${hydra:runtime.choices.model}
    out_dir = Path(cfg.hydra.run.dir)
    with read_write(cfg.hydra):  # set_config made it read-only
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:runtime.output_dir}
    if cfg.get("warm_start") is None:
        checked_resume(cfg, out_dir)
    else:  # a warm start's checks read the sibling's checkpoint with Lightning loaded: the run's full preflight
        from adaptive_attn.runner import preflight

        preflight(cfg, out_dir)
    GlobalHydra.instance().clear()


def main() -> None:
    try:
        check_group_overrides(sys.argv[1:])
        precheck(sys.argv[1:])
    except ConfigError as err:
        fail(str(err))
    apply_training_settings()
    _hydra_main()


if __name__ == "__main__":
    main()
