"""Start the local teachers a task needs and point their configs at them.

Remote teachers ("openai") pass through unchanged. Local ones get a loopback server for the task's duration:
- local_model: llama.cpp's server on the run's 2C GGUF (weights "compressed"), plus 2E's recovery LoRA
  (weights "recovered"); served under a content-addressed alias, so the response cache keys on the weights;
- reference:   the suites' reference solvers over the given rows;
- rubric:      the rubric judge over the given rows (forge.modifiers.local_teachers.rubric_judge_server).
A task that uses local_model teachers must have 2C (and for "recovered", 2E) among its phase inputs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from forge.data.records import DataError
from forge.modifiers.teacher_config import TeacherConfig
from forge.runner import JobContext, input_file

log = logging.getLogger("forge.teachers")


def _weights(ctx: JobContext, teacher: TeacherConfig) -> tuple[Any, Any]:
    for phase in ("2C", "2E") if teacher.weights == "recovered" else ("2C",):
        if phase not in ctx.inputs:
            raise DataError(f"teacher {teacher.name!r} serves the {teacher.weights} model, which needs phase "
                            f"{phase}'s output, but {ctx.phase.id} does not take {phase} as an input")
    gguf = input_file(ctx, "2C", "gguf").path
    lora = input_file(ctx, "2E", "adapter").path if teacher.weights == "recovered" else None
    return gguf, lora


@contextlib.contextmanager
def started_teachers(ctx: JobContext, teachers: Iterable[TeacherConfig],
                     rows: Sequence[Mapping[str, Any]] = ()) -> Iterator[dict[str, TeacherConfig]]:
    """name -> teacher ready to call (local ones pointed at their running server); servers stop on exit.
    rows: what the reference solver and the rubric judge know (records schema)."""
    from forge.modifiers.local_teachers import llama_server, reference_server, rubric_judge_server

    ready: dict[str, TeacherConfig] = {}
    with contextlib.ExitStack() as stack:
        for teacher in teachers:
            if teacher.name in ready:
                continue
            if teacher.kind == "local_model":
                gguf, lora = _weights(ctx, teacher)
                endpoint = stack.enter_context(llama_server(
                    gguf, n_ctx=ctx.config.gguf.n_ctx, n_threads=ctx.config.gguf.n_threads,
                    n_batch=ctx.config.gguf.n_batch, lora_path=lora))
            elif teacher.kind == "reference":
                endpoint = stack.enter_context(reference_server(rows, model=teacher.model))
            elif teacher.kind == "rubric":
                endpoint = stack.enter_context(rubric_judge_server(rows, model=teacher.model))
            else:
                ready[teacher.name] = teacher
                continue
            ready[teacher.name] = endpoint.bind(teacher)
            log.info("teacher %s (%s) at %s as %s", teacher.name, teacher.kind, endpoint.base_url,
                     endpoint.model)
        yield ready
