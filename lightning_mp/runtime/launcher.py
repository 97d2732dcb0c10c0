"""Starting the ranks from a Hydra app, including a multirun sweep.

Lightning's script launcher re-runs the script for each extra rank with ``sys.argv``. Under a Hydra multirun that
is the whole sweep (``-m strategy.microbatches=2,4,8``): every child would start a sweep of its own, in the wrong
directory. :class:`HydraJobLauncher` gives the children the current job instead: its own overrides (one value per
swept key), its output directory, and the config flags of the original command. After the job, the launching
process drops the process group and the environment the launch set, so the next job of the sweep starts its own
processes on a fresh port.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override

# set by the launcher for its children; removed after a sweep job so that the next job launches again
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def hydra_in_use() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return False
    return HydraConfig.initialized()


def hydra_multirun() -> bool:
    """Whether this process runs one job of a Hydra multirun sweep."""
    if not hydra_in_use():
        return False
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def hydra_job_command(local_rank: int) -> tuple[list[str], str]:
    """The command (and working directory) that runs the current Hydra job as rank ``local_rank``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd, to_absolute_path

    import __main__

    hydra = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += config_flags(sys.argv[1:])
    command += list(hydra.overrides.task)
    command += [
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        f"hydra.job.name={hydra.job.name}_rank{local_rank}",
        "hydra.output_subdir=null",  # only the launching process writes the job's .hydra/ config
    ]
    return command, get_original_cwd()


def config_flags(argv: Sequence[str]) -> list[str]:
    """The ``--config-path``/``--config-name``/``--config-dir`` flags (and values) of a Hydra command line."""
    kept: list[str] = []
    take_next = False
    for arg in argv:
        if take_next:
            kept.append(arg)
            take_next = False
        elif arg in _CONFIG_FLAGS:
            kept.append(arg)
            take_next = True
        elif arg.split("=", 1)[0] in _CONFIG_FLAGS:
            kept.append(arg)
    return kept


class HydraJobLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher whose children run the current Hydra job (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._env_before: dict[str, str | None] = {}

    @override
    def _call_children_scripts(self) -> None:
        self._env_before = {key: os.environ.get(key) for key in _LAUNCH_ENV}
        if not hydra_in_use():
            super()._call_children_scripts()
            return
        module = sys.modules[_SubprocessScriptLauncher.__module__]
        lightning_command = module._hydra_subprocess_cmd
        module._hydra_subprocess_cmd = hydra_job_command
        try:
            super()._call_children_scripts()
        finally:
            module._hydra_subprocess_cmd = lightning_command

    def restore_environment(self) -> None:
        """Undo the environment the launch set (the children have ended with their job)."""
        for key, value in self._env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.procs = []
