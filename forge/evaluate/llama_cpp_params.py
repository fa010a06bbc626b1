"""How Forge loads every GGUF into llama.cpp: without llama.cpp's "extra" CPU buffer types.

Why: with llama-cpp-python 0.3.36 on a CPU with AMX (Sapphire Rapids and later), llama.cpp puts Q5_K weights
in its AMX buffer type and then segfaults in ggml_backend_amx_mul_mat on our models (reproduced on the
demo's GGUF every time). `use_extra_bufts = False` keeps the weights in plain CPU buffers; on CPUs
without AMX it only turns off the repacked layouts, which these small models do not need.
Llama() takes no argument for it, so the default params it starts from are patched, in this process
(`plain_cpu_buffers()`) and in llama.cpp's server (`SERVER_MAIN`, run with `python -c`).
"""

from __future__ import annotations

_PATCH = """
import llama_cpp.llama_cpp as _lc
if not getattr(_lc.llama_model_default_params, "_forge_plain_buffers", False):
    _default = _lc.llama_model_default_params
    def _plain(*args, **kwargs):
        params = _default(*args, **kwargs)
        params.use_extra_bufts = False
        return params
    _plain._forge_plain_buffers = True
    _lc.llama_model_default_params = _plain
"""

# `python -c SERVER_MAIN --model ...`: llama-cpp-python's OpenAI-compatible server with the same params
SERVER_MAIN = _PATCH + """
import runpy, sys
sys.argv[0] = "llama_cpp.server"
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


def plain_cpu_buffers() -> None:
    """Patch this process's llama.cpp default model params (idempotent)."""
    exec(compile(_PATCH, __file__, "exec"), {})
