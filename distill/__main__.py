"""``python -m distill +exp=car_assistant``: Hydra at the edge, a plain ``run(cfg)`` inside.

Exit codes: 0 done and the release gate passed; 2 bad config or data (nothing ran); 3 the release gate
failed (or the export did not reproduce the model): the run folder still holds every artifact and the
report; 4 the run folder or disk cannot be used (another experiment's folder, not writable, disk full):
finished stages are kept, and the same command resumes once it is fixed.

Under ``-m`` (Hydra multirun) a job's failure is logged and the sweep goes on; the sweep's summary
(``distill.sweep``) marks it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from distill.config import register_resolvers
from distill.sweep import FAILED

log = logging.getLogger("distill")
register_resolvers()  # ${package_file:...} in conf/ (model wheels)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from distill.config import ConfigError
    from distill.data import DataError
    from distill.manifest import RunFolderError
    from distill.pipeline import run
    from distill.train import TrainingDiverged
    from export.onnx import ExportError

    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    _submitit_job(hc)
    out = Path(hc.runtime.output_dir)
    failed = out / FAILED
    failed.unlink(missing_ok=True)
    code, error = 0, None
    try:
        metrics = run(cfg, out)
    except (ConfigError, DataError, TrainingDiverged) as err:
        code, error = 2, err
    except ExportError as err:
        code, error = 3, err
    except RunFolderError as err:
        code, error = 4, err
    except Exception as err:  # in a sweep, one job's crash must not end the others (the launcher would)
        if not sweeping:
            raise
        log.exception("job %s crashed", hc.job.num)
        code, error = 1, err
    else:
        if metrics.get("gate", {}).get("passed") is False:
            log.error("the release gate failed: %s", "; ".join(metrics["gate"]["failed"]))
            code = 3
    if error is not None and code != 1:
        log.error("%s", error)
    if sweeping:
        from core.files import write_json
        from distill.sweep import refresh_summary

        if error is not None:  # the sweep summary marks the job failed, with why
            write_json(failed, {"exit_code": code, "error": f"{type(error).__name__}: {error}"[:2000]})
        if code:
            log.error(
                "job %s (%s) failed with exit code %d; the sweep goes on", hc.job.num, hc.job.override_dirname, code
            )
        refresh_summary(hc.sweep.dir)  # every job refreshes it: a sweep whose launcher dies still has one
    elif code:
        sys.exit(code)


def _submitit_job(hc) -> None:
    """Inside a submitit job (``hydra/launcher=slurm | submitit_slurm | submitit_local``):

    - ``hydra.launcher.cpus_per_task`` sets torch's threads (and so ONNX Runtime's in the pipeline): the
      job uses what it was given, not every core of the node (``submitit_local`` runs every job at once).
    - With several tasks (``hydra.launcher.tasks_per_node=N``) each task is one rank: Slurm's (or the local
      executor's) variables become RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which
      accelerate reads (each rank on cuda:LOCAL_RANK, so give the job N GPUs per node)."""
    if not any(k.startswith(("SUBMITIT_", "SLURM_JOB_ID")) for k in os.environ):
        return
    try:
        import submitit

        job = submitit.JobEnvironment()
    except Exception:  # not inside a submitit job
        return
    cpus = hc.launcher.get("cpus_per_task") if hc.launcher is not None else None
    if cpus:
        import torch

        torch.set_num_threads(int(cpus))
        log.info("submitit job: %d threads (hydra.launcher.cpus_per_task)", int(cpus))
    if job.num_tasks > 1 and "RANK" not in os.environ:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        log.info("submitit task %d of %d: rank %s", job.global_rank, job.num_tasks, os.environ["RANK"])


if __name__ == "__main__":
    main()
