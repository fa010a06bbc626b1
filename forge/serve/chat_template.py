"""The model's chat template, rendered without transformers: the inference server imports neither torch nor
transformers. Why: a serving image stays small and starts fast, and on a CUDA host torch's bundled cuBLAS,
loaded first, crashed llama.cpp's CUDA build in the same process (the H200 run, benchmarks/README.md).

Renders like transformers' `apply_chat_template`: the template from chat_template.jinja or
tokenizer_config.json, a sandboxed Jinja environment with trim_blocks / lstrip_blocks and loop controls,
the special tokens as variables, `raise_exception` and `strftime_now`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    pass


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|end|>", ...} (AddedToken as JSON)
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str], where: str) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"{where}: the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"{where}: the chat template does not parse: {e}") from None
        self.special = special

    @property
    def eos_token(self) -> str | None:
        return self.special.get("eos_token")

    @classmethod
    def load(cls, folder: str | Path) -> ChatTemplate:
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        if not config_path.is_file():
            raise ChatTemplateError(
                f"{folder}: no tokenizer_config.json (the special tokens and chat template)"
            )
        config = json.loads(config_path.read_text())
        source = None
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text()
        elif isinstance(config.get("chat_template"), str):
            source = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in config["chat_template"]}
            source = named.get("default")
        if not source:
            raise ChatTemplateError(
                f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json's chat_template)"
            )
        special = {k: t for k in SPECIAL_KEYS if (t := _token_text(config.get(k))) is not None}
        return cls(source, special, str(folder))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special
        )


def generation_eos_ids(folder: Path) -> list[int]:
    """eos_token_id(s) of generation_config.json, when the folder has one."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
