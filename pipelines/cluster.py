"""Connecting to Ray: the cluster named in config, RAY_ADDRESS (as under `ray job submit`), or a local one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # cluster to join; empty: RAY_ADDRESS, else start a local one
    num_cpus: int = 0  # CPUs of a newly started local cluster; 0: all


def connect_ray(cfg: RayConfig) -> None:
    """Join the given cluster, RAY_ADDRESS, or the one this process started; else start one."""
    if ray.is_initialized():
        return
    if cfg.address:
        ray.init(address=cfg.address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False)
