"""MkDocs hook: the configuration reference, generated from ``fedpeft.config.Config``.

Why a hook and not a checked-in page: the reference is rendered from the pydantic models
each time the site is built, so a key added to ``fedpeft/config.py`` appears in the docs
with its type, default and description without anyone regenerating a file. A key without
a description fails the build (and ``tests/test_docs.py``), since pydantic reads each
field's attribute docstring (``use_attribute_docstrings``) as its description.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

MARKER = "<!-- config-reference -->"
"""Where the generated reference goes on ``docs/configuration.md``."""
PAGE = "configuration.md"


@dataclass(frozen=True)
class ConfigKey:
    """One leaf key of the config: a row of the reference."""

    dotted: str
    type: str
    default: str
    description: str


@dataclass(frozen=True)
class ConfigSection:
    """One TOML table (``[federation.secure_aggregation]``) and its leaf keys."""

    dotted: str
    summary: str
    """The section's class docstring, as Markdown."""
    keys: list[ConfigKey]
    extra: str | None
    """A note that keys beyond the declared ones are accepted (``extra = "allow"``), else None."""


class MissingDescriptionError(ValueError):
    """A config key or section has no description to document it with."""


def _is_section(annotation: Any) -> typing.TypeGuard[type[BaseModel]]:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _format_type(annotation: Any) -> str:
    """A short, TOML-minded rendering: ``int``, ``"a" | "b"``, ``float | None``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{arg}"' if isinstance(arg, str) else str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_format_type(arg) for arg in args)
    if origin is not None:
        inner = ", ".join(_format_type(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def _format_bounds(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        for kind, attribute, symbol in _BOUNDS:
            if isinstance(item, kind):
                bound = getattr(item, attribute)
                parts.append(f"{symbol} {bound:g}" if isinstance(bound, float) else f"{symbol} {bound}")
    return ", ".join(parts)


def _format_value(value: Any) -> str:
    """Defaults as a TOML file would write them; None as "unset" (TOML has no null)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


_ROLE = re.compile(r":(?:mod|func|class|data|meth|attr):`~?([^`]+)`")
_CODE_SPAN = re.compile(r"(`+).*?\1", re.DOTALL)
_POWER = re.compile(r"(?<=\w)\*\*(?=\w)")


def _to_markdown(text: str) -> str:
    """Docstring text as Markdown: Sphinx roles as code, ``2**32`` outside code not bold."""
    text = _ROLE.sub(r"`\1`", text)
    out, last = [], 0
    for span in _CODE_SPAN.finditer(text):
        out += [_POWER.sub(r"\*\*", text[last : span.start()]), span.group(0)]
        last = span.end()
    out.append(_POWER.sub(r"\*\*", text[last:]))
    return "".join(out)


def _one_line(text: str) -> str:
    """Docstring text as one Markdown table cell: one line, pipes escaped."""
    return " ".join(_to_markdown(text).split()).replace("|", "\\|")


def _summary(model: type[BaseModel]) -> str:
    """The section's class docstring as Markdown paragraphs (Sphinx roles as code)."""
    return _to_markdown(inspect.getdoc(model) or "").strip()


def config_sections(model: type[BaseModel], prefix: str = "") -> Iterator[ConfigSection]:
    """Walk ``model`` and its nested sections, depth first, in declaration order.

    Raises:
        MissingDescriptionError: A leaf key without a description, or a section without a
            docstring (the message names the dotted key).

    """
    keys = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        annotation = field.annotation
        if _is_section(annotation):
            nested.append((dotted, annotation))
            continue
        description = (field.description or "").strip()
        if not description:
            raise MissingDescriptionError(
                f"config key {dotted} has no description: add an attribute docstring under it "
                "in fedpeft/config.py"
            )
        type_text = _format_type(field.annotation)
        bounds = _format_bounds(field)
        keys.append(
            ConfigKey(
                dotted=dotted,
                type=f"{type_text}, {bounds}" if bounds else type_text,
                default=_format_value(field.get_default(call_default_factory=True)),
                description=_one_line(description),
            )
        )
    summary = _summary(model)
    if not summary:
        raise MissingDescriptionError(f"config section {prefix or '(top level)'} has no docstring")
    extra = None
    if model.model_config.get("extra") == "allow":
        extra = f"`[{prefix}]` also takes keys not listed here: see above."
    yield ConfigSection(dotted=prefix, summary=summary, keys=keys, extra=extra)
    for dotted, section in nested:
        yield from config_sections(section, dotted)


def all_keys(model: type[BaseModel]) -> list[str]:
    """Every leaf key of ``model`` as a dotted name (``federation.secure_aggregation.enabled``)."""
    return [key.dotted for section in config_sections(model) for key in section.keys]


def _code(text: str) -> str:
    return "`" + text.replace("`", "") + "`"


def render_reference(model: type[BaseModel] | None = None) -> str:
    """The reference as Markdown: one heading and table per TOML section."""
    if model is None:
        from fedpeft.config import Config

        model = Config
    out = []
    for section in config_sections(model):
        title = f"[{section.dotted}]" if section.dotted else "Top level"
        out += [f"## {title}", "", section.summary, ""]
        if section.keys:
            out += ["| key | type | default | description |", "|---|---|---|---|"]
            for key in section.keys:
                cells = (_code(key.dotted), _code(key.type), _code(key.default), key.description)
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        if section.extra:
            out += [section.extra, ""]
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the marker on the configuration page with the generated reference."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"docs/{PAGE} lost its {MARKER} marker: the reference has nowhere to go")
    return markdown.replace(MARKER, render_reference())
