"""``python -m distill +exp=car_assistant``: Hydra at the edge, a plain ``run(cfg)`` inside.

Exit codes: 0 done and the release gate passed; 2 bad config or data (nothing ran); 3 the release gate
failed (or the export did not reproduce the model): the run folder still holds every artifact and the report.
"""

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
    from export.onnx import ExportError

    try:
        metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, DataError, TrainingDiverged) as err:
        log.error("%s", err)
        sys.exit(2)
    except ExportError as err:
        log.error("%s", err)
        sys.exit(3)
    if metrics.get("gate", {}).get("passed") is False:
        log.error("the release gate failed: %s", "; ".join(metrics["gate"]["failed"]))
        sys.exit(3)


if __name__ == "__main__":
    main()
