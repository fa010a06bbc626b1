"""Run Axolotl (`axolotl train`; with several GPUs `axolotl preprocess` first) on a rendered YAML in Axolotl's
own runtime.

Where Axolotl lives, first match wins (the same convention as operators' `venv:axolotl` runtime):
  1. env FORGE_RUNTIME_AXOLOTL = that runtime's python (its bin/ holds the `axolotl` CLI)
  2. <repo>/.venv-axolotl (scripts/setup_axolotl.sh)
  3. `axolotl` on PATH (the trainer image)
Its bin/ goes first on PATH (the accelerate launcher and Axolotl's helpers are found there), with the env
shared/STACK.md asks for. Output is streamed line by line to our logger; a failure raises AxolotlError
with the tail of the output. Checkpoints are reported (on_checkpoint) as soon as they are complete, so a
job can push them to the artifact store and a retried task resumes from the newest one.

Several GPUs in one job: the operator that runs the job exports FORGE_GPUS=N (its pool slots; on Kubernetes
the pod's `nvidia.com/gpu` limit) and FORGE_LAUNCHER (runtime.launcher). With N > 1, `axolotl train` starts N
data-parallel processes through its own launcher flag: `axolotl train Y --launcher accelerate -- --multi_gpu
--num_processes N ...` (= `accelerate launch ... -m axolotl.cli.train Y`) or `--launcher torchrun --
--standalone --nproc_per_node N`; `train_argv` returns that argv. N = 1 (or unset), or a worker without
GPUs, trains in one process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV = "FORGE_RUNTIME_AXOLOTL"
DEFAULT_VENV = REPO_ROOT / ".venv-axolotl"
# no telemetry, no hub calls (models and data are local files), unbuffered so logs stream as they happen
AXOLOTL_ENV = {"AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
PROGRESS_BAR = re.compile(r"^\s*\d+%\|")  # tqdm redraws (split on \r): only the last one is worth a log line
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TAIL_LINES = 40
GPUS_ENV = "FORGE_GPUS"  # GPUs the operator gave this job (its pool slots / the pod's GPU limit)
LAUNCHER_ENV = "FORGE_LAUNCHER"  # accelerate | torchrun, for N > 1
Launcher = Literal["accelerate", "torchrun"]

log = logging.getLogger("forge.axolotl")


class AxolotlError(RuntimeError):
    """Axolotl failed (or is missing); the message carries the tail of its output."""

    def __init__(self, message: str, returncode: int | None = None, tail: str = ""):
        super().__init__(f"{message}\n--- last lines of Axolotl's output ---\n{tail}" if tail else message)
        self.returncode = returncode
        self.tail = tail


@dataclass
class AxolotlResult:
    output_dir: Path  # Axolotl's output_dir: the final adapter at its top, checkpoint-N folders below
    adapter_files: list[Path]  # what ships: adapter_config.json + adapter_model.safetensors
    global_step: int
    resumed_from: int | None  # the step training continued from, None for a fresh start
    metrics: dict[str, float]  # the last logged value of each number (loss, grad_norm, tokens/s ...)
    log_history: list[dict[str, Any]] = field(default_factory=list)  # trainer_state.json's, one dict per log


# ---------------------------------------------------------------- where Axolotl is


def axolotl_bin_dir() -> Path:
    """The bin/ folder holding the `axolotl` CLI (see the module doc for the search order)."""
    python = os.environ.get(RUNTIME_ENV)
    if python:
        bin_dir = Path(python).parent
        if not (bin_dir / "axolotl").is_file():
            raise AxolotlError(f"{RUNTIME_ENV}={python}: no `axolotl` CLI beside that interpreter")
        return bin_dir
    if (DEFAULT_VENV / "bin" / "axolotl").is_file():
        return DEFAULT_VENV / "bin"
    on_path = shutil.which("axolotl")
    if on_path:
        return Path(on_path).parent
    raise AxolotlError(f"Axolotl is not installed: run scripts/setup_axolotl.sh (creates {DEFAULT_VENV}), "
                       f"or set {RUNTIME_ENV}=/path/to/venv/bin/python, or use the trainer image")


def axolotl_env(bin_dir: Path, mlflow_run_id: str | None = None,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **AXOLOTL_ENV, **(extra or {})}
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)  # the main venv's packages must not leak into Axolotl's
    env.pop("VIRTUAL_ENV", None)
    if mlflow_run_id:
        env["MLFLOW_RUN_ID"] = mlflow_run_id  # transformers' MLflowCallback attaches to this run
    return env


# ---------------------------------------------------------------- the launcher (one GPU or several)


def requested_gpus(env: dict[str, str] | None = None) -> int:
    """N from FORGE_GPUS (set by the GPU operator); 1 when unset."""
    env = os.environ if env is None else env
    raw = env.get(GPUS_ENV, "").strip()
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        raise AxolotlError(f"{GPUS_ENV}={raw!r} is not a GPU count") from None
    if n < 1:
        raise AxolotlError(f"{GPUS_ENV}={n}: a job needs at least one device")
    return n


def requested_launcher(env: dict[str, str] | None = None) -> Launcher:
    env = os.environ if env is None else env
    launcher = env.get(LAUNCHER_ENV, "").strip() or "accelerate"
    if launcher not in ("accelerate", "torchrun"):
        raise AxolotlError(f"{LAUNCHER_ENV}={launcher!r}: expected 'accelerate' or 'torchrun'")
    return launcher  # type: ignore[return-value]


def train_argv(yaml_path: str | Path, n_gpus: int, launcher: Launcher = "accelerate", *,
               axolotl: str = "axolotl", main_process_port: int | None = None) -> list[str]:
    """The `axolotl train` command for one rendered YAML on n_gpus devices.

    1 device: Axolotl's in-process trainer (`--launcher python`: CPU or the one visible GPU).
    N > 1: data parallel, one process per GPU, through Axolotl's launcher flag; what follows `--` goes to the
    launcher. accelerate is given every setting (a stray ~/.cache/huggingface/accelerate config must not
    decide); torchrun's --standalone picks a free rendezvous port itself.
    """
    base = [axolotl, "train", str(yaml_path)]
    if n_gpus < 1:
        raise AxolotlError(f"n_gpus must be >= 1 (got {n_gpus})")
    if n_gpus == 1:
        return [*base, "--launcher", "python"]
    if launcher == "accelerate":
        args = ["--multi_gpu", "--num_processes", str(n_gpus), "--num_machines", "1",
                "--dynamo_backend", "no"]
        if main_process_port is not None:
            args += ["--main_process_port", str(main_process_port)]
        return [*base, "--launcher", "accelerate", "--", *args]
    if launcher == "torchrun":
        return [*base, "--launcher", "torchrun", "--", "--standalone", "--nnodes", "1",
                "--nproc_per_node", str(n_gpus)]
    raise AxolotlError(f"unknown launcher {launcher!r}: expected 'accelerate' or 'torchrun'")


def _free_port() -> int:
    """A free local port for accelerate's rendezvous: two multi-GPU jobs on one box must not share 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def visible_gpus(env: dict[str, str]) -> tuple[int | None, str]:
    """(GPUs the job can see, how that was found); None when unknown (no torch here)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()]), f"CUDA_VISIBLE_DEVICES={visible!r}"
    try:
        import torch
    except ImportError:  # Axolotl's launcher will say it
        return None, "unknown"
    return torch.cuda.device_count(), "torch.cuda.device_count()"


def launch_gpus(n_gpus: int, env: dict[str, str], logger: logging.Logger) -> int:
    """The processes to launch for N requested GPUs: N when N are visible; 1 on a CPU-only worker (the GPU
    operator's rule: the same job runs on CPU there); an error for 0 < visible < N (NCCL would hang, or
    ranks would share a GPU)."""
    if n_gpus <= 1:
        return 1
    count, where = visible_gpus(env)
    if count is None or count >= n_gpus:
        return n_gpus
    if count == 0:
        logger.warning("%s=%d but no GPU is visible (%s): training in one process on CPU", GPUS_ENV, n_gpus,
                       where)
        return 1
    raise AxolotlError(f"{GPUS_ENV}={n_gpus} but this worker sees {count} GPU(s) ({where}): give the task as "
                       "many devices as it takes pool slots, or lower runtime.gpus of this phase")


# ---------------------------------------------------------------- streaming a child


def _log_lines(raw: str) -> list[str]:
    parts = [p.rstrip() for p in raw.rstrip("\n").split("\r") if p.strip()]
    bars = [p for p in parts if PROGRESS_BAR.match(p)]
    return [p for p in parts if not PROGRESS_BAR.match(p)] + bars[-1:]


def _stream(cmd: list[str], env: dict[str, str], cwd: Path, logger: logging.Logger,
            on_line: Callable[[], None] | None = None) -> tuple[int, str]:
    """Run `cmd`, log its merged stdout/stderr line by line; (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    # own session: killing it (our finally, on any exception incl. the task being terminated) takes
    # the launcher's children with it
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in _log_lines(raw):
                logger.info("%s", line)
                tail.append(line)
            if on_line:
                on_line()
        return proc.wait(), "\n".join(tail)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- checkpoints


def _checkpoint_step(path: Path) -> int | None:
    """N for a *complete* checkpoint-N folder: trainer_state.json is the Trainer's last write there."""
    m = CHECKPOINT.match(path.name)
    if not m:
        return None
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return int(m.group(1)) if state.get("global_step") == int(m.group(1)) else None


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint-N folders under output_dir, oldest first."""
    root = Path(output_dir)
    steps = [(_checkpoint_step(p), p) for p in root.glob("checkpoint-*") if p.is_dir()]
    return sorted((s, p) for s, p in steps if s is not None)


def latest_checkpoint(output_dir: str | Path) -> tuple[int, Path] | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def stage_checkpoint(step: int, source: str | Path, output_dir: str | Path) -> Path:
    """Put a checkpoint (e.g. restored from the artifact store) where Axolotl expects it:
    output_dir/checkpoint-N. Pass the result as render_axolotl_yaml(resume_from=...)."""
    source = Path(source)
    if not (source / "trainer_state.json").is_file():
        raise AxolotlError(f"{source} is not a trainer checkpoint (no trainer_state.json)")
    target = Path(output_dir) / f"checkpoint-{step}"
    if target.resolve() != source.resolve():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
    if _checkpoint_step(target) != step:
        raise AxolotlError(f"{source}: trainer_state.json's global_step is not {step}")
    return target


class _CheckpointWatch:
    """Reports each complete checkpoint once (called after every output line and at the end)."""

    def __init__(self, output_dir: Path, on_checkpoint: Callable[[int, Path], None] | None,
                 after: int | None):
        self.output_dir, self.on_checkpoint = output_dir, on_checkpoint
        self.seen = after if after is not None else -1

    def __call__(self) -> None:
        if not self.on_checkpoint or not self.output_dir.is_dir():
            return
        # called per output line: look only at folders newer than the last one reported
        newer = sorted((int(m.group(1)), p) for p in self.output_dir.glob("checkpoint-*")
                       if (m := CHECKPOINT.match(p.name)) and int(m.group(1)) > self.seen)
        for step, path in newer:
            if _checkpoint_step(path) == step:
                self.seen = step
                try:
                    self.on_checkpoint(step, path)
                except FileNotFoundError as e:  # rotated away (save_total_limit): the next one counts
                    log.warning("checkpoint-%d vanished while being saved (%s); a newer one follows", step, e)


# ---------------------------------------------------------------- the runs


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise AxolotlError(f"Axolotl config {path} does not exist")
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict) or not cfg.get("output_dir"):
        raise AxolotlError(f"Axolotl config {path} has no output_dir")
    return cfg


def run_axolotl(
    yaml_path: str | Path,
    *,
    logger: logging.Logger | None = None,
    mlflow_run_id: str | None = None,
    env: dict[str, str] | None = None,
    launcher: Literal["python", "accelerate", "torchrun"] | None = None,
    gpus: int | None = None,
    on_checkpoint: Callable[[int, Path], None] | None = None,
) -> AxolotlResult:
    """`axolotl train` for one rendered YAML; the adapter and its metrics. One process tokenizes the data
    itself (into the YAML's dataset_prepared_path); with several, `axolotl preprocess` runs first so that
    the ranks load one prepared copy instead of each tokenizing it (a separate start costs ~10 s of imports).

    gpus: data-parallel processes (default: FORGE_GPUS, else 1). launcher: "python" forces one process;
    "accelerate"/"torchrun" choose the multi-GPU launcher (default: FORGE_LAUNCHER, else accelerate).
    on_checkpoint(step, folder): called once per complete checkpoint (e.g. JobContext.save_checkpoint).
    """
    logger = logger or log
    yaml_path = Path(yaml_path).resolve()
    cfg = _read_yaml(yaml_path)
    output_dir = Path(cfg["output_dir"])
    resume = cfg.get("resume_from_checkpoint")
    resumed_from = _checkpoint_step(Path(resume)) if resume else None
    if resume and resumed_from is None:
        raise AxolotlError(f"{yaml_path}: resume_from_checkpoint {resume} is not a complete checkpoint")
    bin_dir = axolotl_bin_dir()
    child_env = axolotl_env(bin_dir, mlflow_run_id, env)
    axolotl = str(bin_dir / "axolotl")
    n_gpus = 1 if launcher == "python" else (gpus if gpus is not None else requested_gpus(child_env))
    multi: Launcher = launcher if launcher in ("accelerate", "torchrun") else requested_launcher(child_env)
    n_gpus = launch_gpus(n_gpus, child_env, logger)
    port = _free_port() if n_gpus > 1 and multi == "accelerate" else None
    train_cmd = train_argv(yaml_path, n_gpus, multi, axolotl=axolotl, main_process_port=port)

    steps: list[tuple[str, list[str], _CheckpointWatch | None]] = [
        ("train", train_cmd, _CheckpointWatch(output_dir, on_checkpoint, resumed_from))]
    if n_gpus > 1:
        steps.insert(0, ("preprocess", [axolotl, "preprocess", str(yaml_path)], None))
    for name, cmd, on_line in steps:
        where = f", {n_gpus} GPUs via {multi}" if name == "train" and n_gpus > 1 else ""
        logger.info("axolotl %s %s (runtime %s%s)", name, yaml_path.name, bin_dir.parent, where)
        rc, tail = _stream(cmd, child_env, yaml_path.parent, logger, on_line)
        if rc != 0:
            last = tail.splitlines()[-1].strip() if tail else "no output"  # usually the exception itself
            raise AxolotlError(f"`axolotl {name} {yaml_path}` failed with exit code {rc}: {last}", rc, tail)
        if on_line:
            on_line()  # the last checkpoint, now that the trainer is done with it
    return collect_result(output_dir, resumed_from)


def collect_result(output_dir: str | Path, resumed_from: int | None = None) -> AxolotlResult:
    """The finished run's adapter files and metrics (from the newest checkpoint's trainer_state.json)."""
    output_dir = Path(output_dir)
    missing = [f for f in ADAPTER_FILES if not (output_dir / f).is_file()]
    if missing:
        raise AxolotlError(f"Axolotl finished but {output_dir} lacks {missing}: no adapter was saved")
    last = latest_checkpoint(output_dir)
    if last is None:
        raise AxolotlError(f"Axolotl finished but {output_dir} has no checkpoint with a trainer_state.json "
                           "(save_strategy 'steps', as rendered, saves one at the end: was it changed?)")
    state = json.loads((last[1] / "trainer_state.json").read_text())
    history = [h for h in state.get("log_history", []) if isinstance(h, dict)]
    return AxolotlResult(output_dir=output_dir, adapter_files=[output_dir / f for f in ADAPTER_FILES],
                         global_step=int(state["global_step"]), resumed_from=resumed_from,
                         metrics=summarize_history(history), log_history=history)


def summarize_history(history: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The last value of each numeric key (loss, grad_norm, learning_rate, tokens/s, eval_loss ...). The
    Trainer's closing summary (train_loss, train_runtime) is logged after its last checkpoint, so it is
    not here: it reaches MLflow and the log."""
    out: dict[str, float] = {}
    for entry in history:
        for k, v in entry.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("step", "epoch"):
                out[k] = float(v)
    return out


# ---------------------------------------------------------------- Axolotl's own validation

_VALIDATE = """
import json, sys
from axolotl.cli.config import load_cfg
cfg = load_cfg(sys.argv[1])
keys = ("base_model", "adapter", "load_in_4bit", "sequence_len", "micro_batch_size",
        "gradient_accumulation_steps", "batch_size", "num_epochs", "max_steps", "learning_rate",
        "lr_scheduler", "optimizer", "bf16", "fp16", "lora_r", "lora_alpha", "lora_target_linear",
        "lora_target_modules", "lora_mlp_kernel", "output_dir", "resume_from_checkpoint",
        "lora_model_dir", "use_mlflow", "device", "rl", "rl_beta", "chat_template")
out = {k: cfg.get(k) for k in keys}
out["dataset_types"] = [d.get("type") for d in cfg.get("datasets") or []]
print("FORGE_AXOLOTL_CONFIG " + json.dumps(out, default=str), flush=True)
"""


def validate_yaml(path: str | Path, logger: logging.Logger | None = None) -> dict[str, Any]:
    """Load the YAML with Axolotl's own loader (axolotl.cli.config.load_cfg: pydantic schema, validators,
    normalization), inside Axolotl's runtime. The normalized key settings; AxolotlError if rejected."""
    logger = logger or log
    path = Path(path).resolve()
    _read_yaml(path)
    bin_dir = axolotl_bin_dir()
    python = bin_dir / "python"
    if not python.is_file():
        python = bin_dir / "python3"
    proc = subprocess.run([str(python), "-c", _VALIDATE, str(path)], env=axolotl_env(bin_dir),
                          cwd=path.parent, capture_output=True, text=True, errors="replace")
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("FORGE_AXOLOTL_CONFIG ")]
    if proc.returncode != 0 or not marker:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # pydantic's "Value error, <why>" lines are the reason; the traceback above them is noise
        reasons = [ln.strip() for ln in lines if "Value error," in ln or "validation error" in ln]
        why = "; ".join(reasons) or (lines[-1] if lines else "no output")
        raise AxolotlError(f"Axolotl rejected {path}: {why}", proc.returncode, "\n".join(lines[-TAIL_LINES:]))
    logger.info("Axolotl accepted %s", path.name)
    return json.loads(marker[-1].split(" ", 1)[1])
