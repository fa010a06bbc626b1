"""ForgeGPUJobOperator: a Forge phase that wants GPUs.

Scheduling: pool "gpu" (pool_slots = GPUs taken, so the pool's size = the machine's GPU count
caps concurrency), queue "gpu" (Celery/Edge workers on GPU nodes; LocalExecutor ignores it).
Placement: CUDA_VISIBLE_DEVICES from `devices` when given, else the worker's own setting.
On a CPU-only worker the same job runs on CPU (the job picks its device with `auto`).

GPUs per task: `gpus=`, else len(devices), else the deployment profile's `runtime.gpus` for the phase
(read when the DAG is parsed: pool slots are fixed then), else 1. The same N is the pod's
`nvidia.com/gpu` limit on Kubernetes and, for N > 1, the processes of Axolotl's launcher (FORGE_GPUS).
When the deployment's backend is kubernetes the task only launches a pod: it keeps the pool (the
cluster's GPU budget) but not the `gpu` queue, so any worker can launch it.
"""

from __future__ import annotations

import os
from typing import Any

from forge.phases import get_phase
from forge.runtime_config import RuntimeConfig
from operators.forge_job import ForgeJobOperator
from operators.runtimes import deployment_runtime

GPU_POOL = os.environ.get("FORGE_GPU_POOL", "gpu")
GPU_QUEUE = os.environ.get("FORGE_GPU_QUEUE", "gpu")
GPUS_ENV, LAUNCHER_ENV = "FORGE_GPUS", "FORGE_LAUNCHER"  # read by forge/modifiers/axolotl_runner.py


class ForgeGPUJobOperator(ForgeJobOperator):
    """:param gpus: GPUs the job takes (pool slots); defaults to len(devices), else the deployment
        profile's `runtime.gpus` for the phase, else 1.
    :param devices: CUDA device ids for CUDA_VISIBLE_DEVICES, e.g. [0, 1] or "0,1".
    """

    ui_color = "#fde8e8"

    def __init__(self, *, gpus: int | None = None, devices: str | list[int] | None = None,
                 **kwargs: Any) -> None:
        if isinstance(devices, str):
            device_ids = [d.strip() for d in devices.split(",") if d.strip()]
        else:
            device_ids = [str(d) for d in devices or []]
        deployment = deployment_runtime()
        if gpus is None:
            phase = get_phase(kwargs["phase_id"])
            gpus = len(device_ids) or deployment.gpus_for(phase.id, phase.step)
        if gpus < 1:
            raise ValueError(f"gpus must be >= 1 (got {gpus})")
        if device_ids and len(device_ids) != gpus:
            raise ValueError(f"devices {device_ids} do not match gpus={gpus}")
        if kwargs.get("pool_slots", gpus) != gpus:
            raise ValueError(f"pool_slots={kwargs['pool_slots']} must equal the GPUs the task takes ({gpus})")
        # explicit kwargs win; otherwise the GPU pool/queue (not the DAG's default_args)
        kwargs.setdefault("pool", GPU_POOL)
        kwargs["pool_slots"] = gpus
        if deployment.backend != "kubernetes":  # a pod launcher needs no GPU worker
            kwargs.setdefault("queue", GPU_QUEUE)
        super().__init__(**kwargs)
        self.gpus = gpus
        self.devices = device_ids

    def job_env(self) -> dict[str, str]:
        env = super().job_env()
        if self.devices:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        return env

    def requested_gpus(self) -> int:
        return self.gpus

    def runtime_env(self, settings: RuntimeConfig) -> dict[str, str]:
        """N > 1: the job's Axolotl launcher starts N processes (forge/modifiers/axolotl_runner.py)."""
        phase = get_phase(self.phase_id)
        wanted = settings.gpus_for(phase.id, phase.step)
        if (phase.id in settings.gpus or phase.step in settings.gpus) and wanted != self.gpus:
            self.log.warning("this run's runtime.gpus asks %d GPU(s) for %s, but the task was parsed with %d "
                             "pool slot(s) (the deployment profile's setting): it runs on %d", wanted,
                             phase.id, self.gpus, self.gpus)
        return {GPUS_ENV: str(self.gpus), LAUNCHER_ENV: settings.launcher} if self.gpus > 1 else {}
