"""Connecting to Ray the same way from a job, the CLI and the tests.

Under `ray job submit` (or with RAY_ADDRESS set) we join the running cluster. Otherwise we
start a local one that listens on loopback only: Ray's core services bind to every
interface unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set before they start, and usage
stats would try the network. Both are set here, before the first `ray.init`.
"""

from __future__ import annotations

import logging
import os

LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}


def init_ray(address: str | None = None, num_cpus: int | None = None, *, dashboard: bool = True) -> dict:
    """Connect to `address` (or RAY_ADDRESS), else start a loopback-only local Ray. Idempotent.

    Returns `ray.init`'s address info. `num_cpus` only applies to a cluster started here. A
    local cluster gets the dashboard (http://127.0.0.1:8265) by default: people watch runs on
    it, and Ray's State API, which Ray Train's placement-group cleaner polls, lives in it
    (without it that cleaner logs a warning every few seconds).
    """
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return {"gcs_address": ray.get_runtime_context().gcs_address}
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        info = ray.init(address=address, **kwargs)
    else:
        info = ray.init(
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            **kwargs,
        )
    _quiet_ray_data()
    return dict(info.address_info)


def _quiet_ray_data() -> None:
    """Ray Data's progress bars flood CI logs; our stages print their own progress lines."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def check_job_paths(**paths: str | None) -> None:
    """Refuse relative paths under `ray job submit --working-dir`: the job runs in a temporary
    copy of the working directory (without git-ignored folders such as runs/), so a relative
    policy would not be found and a relative output would vanish with the copy. ValueError
    naming the field and the fix (a `ConfigError`, which the commands print without a traceback)."""
    import os
    from pathlib import Path

    from mathprm.config import ConfigError

    if "/runtime_resources/working_dir_files/" not in os.getcwd() + "/":
        return
    for name, value in paths.items():
        if value and not Path(value).is_absolute():
            raise ConfigError(f"{name}: {value!r} is relative, but this job runs in a temporary copy of its working "
                             f"directory; pass an absolute path, e.g. {name}=$PWD/{value}")
