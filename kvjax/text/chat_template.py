"""Chat templates rendered as Hugging Face transformers renders them: a sandboxed jinja2
environment with `raise_exception`, `strftime_now` and a `tojson` filter; each template string is
compiled once."""

import datetime
import functools
import json
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["render_chat_template", "validate_messages"]


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    source: str = "<chat template>",
    **extra: Any,
) -> str:
    """Renders a conversation into the prompt text the model was trained on.

    Args:
        template: the jinja2 chat template.
        messages: dicts with a str "role" and a str "content" (other keys pass through).
        add_generation_prompt: end with the header of an assistant turn.
        bos_token, eos_token: the texts of the special tokens the template may write.
        source: where the template came from, named in errors.
        **extra: further template variables (e.g. `tools`, `documents`).

    Raises:
        ValueError: the messages are malformed, the template does not compile, or rendering
            fails (including the template's own `raise_exception`).
    """
    validate_messages(messages)
    compiled = _compile(template, source)
    try:
        # transformers always passes tools and documents (None when unused), and templates
        # test `tools is not none`: an undefined variable is not none in jinja2.
        variables = {"tools": None, "documents": None, **extra}
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **variables,
        )
    except Exception as error:  # the template is foreign code: any failure is a bad template/input
        raise ValueError(f"chat template {source}: {type(error).__name__}: {error}") from error


def validate_messages(messages: list[dict]) -> None:
    """Raises ValueError naming the first message that is not a dict with str role and content."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"messages[{index}] needs a str {key!r}, got {message.get(key)!r}")


def _compile(template: str, source: str) -> jinja2.Template:
    try:
        return _compile_cached(template)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(
            f"chat template {source}: syntax error at line {error.lineno}: {error.message}"
        ) from error


@functools.lru_cache(maxsize=64)
def _compile_cached(template: str) -> jinja2.Template:
    return _environment().from_string(template)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)
