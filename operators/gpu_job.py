"""ForgeGPUJobOperator: a Forge phase that wants GPUs.

Scheduling: pool "gpu" (pool_slots = GPUs taken, so the pool's size = the machine's GPU count
caps concurrency), queue "gpu" (Celery/Edge workers on GPU nodes; LocalExecutor ignores it).
Placement: CUDA_VISIBLE_DEVICES from `devices` when given, else the worker's own setting.
On a CPU-only worker the same job runs on CPU (the job picks its device with `auto`).
"""

from __future__ import annotations

import os
from typing import Any

from operators.forge_job import ForgeJobOperator

GPU_POOL = os.environ.get("FORGE_GPU_POOL", "gpu")
GPU_QUEUE = os.environ.get("FORGE_GPU_QUEUE", "gpu")


class ForgeGPUJobOperator(ForgeJobOperator):
    """:param gpus: GPUs the job takes (pool slots); defaults to len(devices) or 1.
    :param devices: CUDA device ids for CUDA_VISIBLE_DEVICES, e.g. [0, 1] or "0,1".
    """

    ui_color = "#fde8e8"

    def __init__(self, *, gpus: int | None = None, devices: str | list[int] | None = None,
                 **kwargs: Any) -> None:
        if isinstance(devices, str):
            device_ids = [d.strip() for d in devices.split(",") if d.strip()]
        else:
            device_ids = [str(d) for d in devices or []]
        gpus = gpus if gpus is not None else (len(device_ids) or 1)
        if gpus < 1:
            raise ValueError(f"gpus must be >= 1 (got {gpus})")
        if device_ids and len(device_ids) != gpus:
            raise ValueError(f"devices {device_ids} do not match gpus={gpus}")
        # explicit kwargs win; otherwise the GPU pool/queue (not the DAG's default_args)
        kwargs.setdefault("pool", GPU_POOL)
        kwargs.setdefault("pool_slots", gpus)
        kwargs.setdefault("queue", GPU_QUEUE)
        super().__init__(**kwargs)
        self.gpus = gpus
        self.devices = device_ids

    def job_env(self) -> dict[str, str]:
        env = super().job_env()
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        return env
