"""Axolotl's launcher: one process for one GPU, N data-parallel processes (accelerate / torchrun) for N > 1,
N taken from FORGE_GPUS (the operator's pool slots). No Axolotl run here: the commands are captured."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from forge.modifiers import axolotl_runner
from forge.modifiers.axolotl_runner import (
    AxolotlError,
    AxolotlResult,
    requested_gpus,
    requested_launcher,
    run_axolotl,
    train_argv,
)


def test_one_gpu_trains_in_one_process() -> None:
    assert train_argv("/w/axolotl.yaml", 1) == ["axolotl", "train", "/w/axolotl.yaml", "--launcher", "python"]
    assert train_argv("/w/a.yaml", 1, "torchrun") == ["axolotl", "train", "/w/a.yaml", "--launcher", "python"]


def test_four_gpus_launch_four_processes_with_accelerate() -> None:
    argv = train_argv("/w/axolotl.yaml", 4, "accelerate", axolotl="/venv/bin/axolotl",
                      main_process_port=29611)
    assert argv[:5] == ["/venv/bin/axolotl", "train", "/w/axolotl.yaml", "--launcher", "accelerate"]
    launcher_args = argv[argv.index("--") + 1:]  # Axolotl hands these to `accelerate launch`
    assert launcher_args[launcher_args.index("--num_processes") + 1] == "4"
    assert {"--multi_gpu", "--num_machines", "--main_process_port"} <= set(launcher_args)
    assert launcher_args[launcher_args.index("--main_process_port") + 1] == "29611"


def test_four_gpus_launch_four_processes_with_torchrun() -> None:
    argv = train_argv("/w/axolotl.yaml", 4, "torchrun")
    assert argv[:5] == ["axolotl", "train", "/w/axolotl.yaml", "--launcher", "torchrun"]
    launcher_args = argv[argv.index("--") + 1:]
    assert launcher_args[launcher_args.index("--nproc_per_node") + 1] == "4"
    assert "--standalone" in launcher_args  # single node, a free rendezvous port


def test_gpus_and_launcher_come_from_the_operator_env() -> None:
    assert requested_gpus({}) == 1
    assert requested_gpus({"FORGE_GPUS": "4"}) == 4
    assert requested_launcher({}) == "accelerate"
    assert requested_launcher({"FORGE_LAUNCHER": "torchrun"}) == "torchrun"
    for bad in ("four", "0"):
        with pytest.raises(AxolotlError, match="FORGE_GPUS"):
            requested_gpus({"FORGE_GPUS": bad})
    with pytest.raises(AxolotlError, match="FORGE_LAUNCHER"):
        requested_launcher({"FORGE_LAUNCHER": "deepspeed"})


@pytest.fixture
def captured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """run_axolotl with Axolotl's processes replaced by a recorder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "axolotl").write_text("#!/bin/sh\n")
    commands: list[list[str]] = []

    def fake_stream(cmd: list[str], env: dict, cwd: Path, logger, on_line=None) -> tuple[int, str]:
        commands.append(cmd)
        return 0, ""

    monkeypatch.setattr(axolotl_runner, "axolotl_bin_dir", lambda: bin_dir)
    monkeypatch.setattr(axolotl_runner, "_stream", fake_stream)
    monkeypatch.setattr(axolotl_runner, "collect_result", lambda output_dir, resumed_from=None:
                        AxolotlResult(Path(output_dir), [], 0, None, {}))
    monkeypatch.delenv("FORGE_GPUS", raising=False)
    monkeypatch.delenv("FORGE_LAUNCHER", raising=False)
    return commands


def _yaml(tmp_path: Path) -> Path:
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out")}))
    return path


def test_run_axolotl_uses_the_multi_gpu_launcher_when_the_operator_asks(
        tmp_path: Path, captured: list[list[str]]) -> None:
    run_axolotl(_yaml(tmp_path))
    assert len(captured) == 1 and captured[-1][-2:] == ["--launcher", "python"]  # one process: it tokenizes
    run_axolotl(_yaml(tmp_path), env={"FORGE_GPUS": "4", "FORGE_LAUNCHER": "torchrun",
                                      "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    preprocess, train = captured[-2:]
    assert preprocess[1] == "preprocess"  # tokenizing stays one process
    assert train[train.index("--launcher") + 1] == "torchrun"
    assert train[train.index("--nproc_per_node") + 1] == "4"
    run_axolotl(_yaml(tmp_path), gpus=2, env={"CUDA_VISIBLE_DEVICES": "4,5"})
    train = captured[-1]
    assert train[train.index("--launcher") + 1] == "accelerate"
    assert train[train.index("--num_processes") + 1] == "2"


def test_more_processes_than_visible_gpus_fail_before_launching(tmp_path: Path,
                                                                 captured: list[list[str]]) -> None:
    with pytest.raises(AxolotlError, match=r"FORGE_GPUS=4 but this worker sees 2 GPU\(s\)"):
        run_axolotl(_yaml(tmp_path), env={"FORGE_GPUS": "4", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert captured == []
    # a CPU-only worker: the same job in one process (as every GPU phase does there)
    run_axolotl(_yaml(tmp_path), env={"FORGE_GPUS": "4", "CUDA_VISIBLE_DEVICES": ""})
    assert captured[-1][-2:] == ["--launcher", "python"]
