"""``python -m distill +exp=car_assistant``: Hydra at the edge, a plain ``run(cfg)`` inside."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger("distill")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from distill.config import ConfigError
    from distill.data import DataError
    from distill.pipeline import run
    from distill.trainer import TrainingDiverged

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, DataError, TrainingDiverged) as err:
        log.error("%s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
