"""Multi-rank Lightning jobs inside a Hydra multirun: run each job as a fresh single run of the script.

With the basic launcher, every job of a multirun runs in the sweep's own process, one after another.
Lightning's launchers do not fit there (measured, Lightning 2.6 / Hydra 1.3):

- ``popen`` (the default) re-runs ``sys.argv`` for ranks 1..N-1: the child re-runs the whole sweep.
- ``spawn``/``fork`` start fresh workers for ``fit`` and again for ``test``, bring back only the callback
  metrics and the weights (not a callback's own records), and need everything picklable.
- Lightning sets ``MASTER_PORT`` in the sweep process at the first launch; later jobs reuse that port.

So the job re-runs the same script in *run* mode with the job's overrides and output dir, as a child
process: a clean interpreter per job (its own free port, process group, seeds) that launches its ranks
exactly like a single run, then writes its results into the job's output dir for the sweep to read.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``, or ``hydra.mode=MULTIRUN`` in the config)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_command() -> list[str]:
    """The command line that runs the current multirun job as a single run in the job's output dir."""
    import __main__

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:  # started as a script
        program = [sys.executable, os.path.abspath(sys.argv[0])]
    else:  # started with python -m
        program = [sys.executable, "-m", __main__.__spec__.name]
    return [
        *program,
        f"--config-name={hydra_cfg.job.config_name}",
        *hydra_cfg.overrides.task,
        # Run mode even if the config asks for a multirun (an hparams_search config sets hydra.mode).
        "hydra.mode=RUN",
        f"hydra.run.dir={hydra_cfg.runtime.output_dir}",
        # The sweep already saved this job's config in <output dir>/.hydra.
        "hydra.output_subdir=null",
    ]


def run_job_in_fresh_process(result_name: str) -> Path:
    """Run the current multirun job as a fresh single run of this script, wait for it, and return the path
    of the file ``result_name`` it must write into the job's output dir.

    Raises ``RuntimeError`` naming the job and its output dir if the run fails or writes no result.
    """
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    # Without MASTER_PORT Lightning picks a free port for each job; an inherited one could still be held
    # by a rank of the previous job that has not exited yet.
    env = {key: value for key, value in os.environ.items() if key != "MASTER_PORT"}
    code = subprocess.run(job_command(), env=env, cwd=hydra_cfg.runtime.cwd).returncode
    result = output_dir / result_name
    if code != 0 or not result.is_file():
        raise RuntimeError(
            f"job #{hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}) failed with exit code {code} "
            f"or wrote no {result_name}; see {output_dir}"
        )
    return result
