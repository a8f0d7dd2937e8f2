"""Connecting to Ray: the cluster named in config, RAY_ADDRESS (as under `ray job submit`), or a local one."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import ray

from pipelines.logs import reroute_loggers
from pipelines.tracking.tracker import stop_on_sigterm


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # cluster to join; empty: RAY_ADDRESS, else start a local one
    num_cpus: int = 0  # CPUs of a newly started local cluster; 0: all


def connect_ray(cfg: RayConfig) -> None:
    """Join the given cluster, RAY_ADDRESS, or the one this process started; else start one.

    A local cluster starts with its dashboard: Ray's state API lives there, and without it Ray
    Train's placement-group cleaner warns every few seconds that it cannot query actor state.
    """
    quiet_data_output()
    if ray.is_initialized():
        return
    if cfg.address:
        ray.init(address=cfg.address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_config=ray.LoggingConfig(log_level="WARNING"))
    reroute_loggers()  # ray.init installs handlers of its own; a command's log file (pipelines.logs) takes them
    stop_on_sigterm()  # `ray job stop`: runs end KILLED


def quiet_data_output() -> None:
    """Ray Data progress bars only on a terminal, and no plan dump at each execution start: in a
    log (a job, CI, `make demo > log`) they repeat every few seconds and bury the stage progress."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()
    context.print_on_execution_start = False
    reroute_loggers()
