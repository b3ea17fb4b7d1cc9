"""MkDocs hook: the CLI and configuration reference pages, generated at build time so they cannot drift.

A page body holds placeholders, each an HTML comment on a line of its own:

``<!-- rpsft:cli -->``
    Every command of the ``rpsft`` Typer app (``rpsft.cli:app``), walked recursively: usage, help text and a
    table of its arguments and options (name, type, default, help). Hidden commands and options are left out.

``<!-- rpsft:methods -->``
    The table of training methods that ``rpsft methods`` prints (``rpsft.core.method_table``).

``<!-- rpsft:config MODULE [Model ...] -->``
    A table (field, type, default, description) for each pydantic model defined in ``MODULE`` (or in its
    submodules, when it is a package), followed by every model its fields nest (``space:`` of a sweep, the
    evaluation's settings, ...), wherever that model is defined. With model names, only those models and what
    they nest. A model already shown on the page is linked, not repeated.

The same functions serve the tests (``tests/test_docs.py``): :func:`fill` turns a page's Markdown into the
generated one.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import pkgutil
import re
import types
import typing
from pathlib import Path
from typing import Any

PLACEHOLDER = re.compile(
    r"^<!--\s*rpsft:(?P<kind>cli|config|methods)\b(?P<args>[^>]*?)\s*-->\s*$", re.MULTILINE
)
CLI_APP = "rpsft.cli:app"
METHOD_TABLE = "rpsft.core.method_table"


# ------------------------------------------------------------------------------------------------ markdown


def _escape(text: str, table: bool = False) -> str:
    """Markdown-safe text: code spans (backticks) kept as they are; outside them, characters that Markdown or
    HTML would read (``<``, ``>``, ``*``, ``[``, ``]``, and ``|`` in a table cell) escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 1:  # a code span (the table extension leaves pipes inside code spans alone)
            out.append(part)
            continue
        part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        part = re.sub(r"([*\[\]\\])", r"\\\1", part)
        if table:
            part = part.replace("|", "\\|")
        out.append(part)
    return "".join(out)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _rst_to_md(text: str) -> str:
    """Docstring markup (reStructuredText roles and literals) as Markdown code spans."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _code(value: str) -> str:
    fence = "``" if "`" in value else "`"
    return f"{fence}{value}{fence}"


# ------------------------------------------------------------------------------------------------ the CLI


def _load_app() -> Any:
    import typer

    module_name, attr = CLI_APP.split(":")
    app = getattr(importlib.import_module(module_name), attr)
    return typer.main.get_command(app)


def cli_commands(root: Any | None = None) -> list[tuple[str, Any, Any]]:
    """``(command path, command, context)`` of every visible command of the app, depth first, the root first."""
    root = root if root is not None else _load_app()
    out: list[tuple[str, Any, Any]] = []

    def walk(command: Any, path: str, ctx: Any) -> None:
        out.append((path, command, ctx))
        if hasattr(command, "list_commands"):  # a group
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is None or getattr(sub, "hidden", False):
                    continue
                walk(sub, f"{path} {name}", sub.context_class(sub, info_name=name, parent=ctx))

    walk(root, "rpsft", root.context_class(root, info_name="rpsft"))
    return out


def _param_type(param: Any, ctx: Any) -> str:
    if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
        return "flag"
    if getattr(param, "is_bool_flag", False):
        return "switch"
    try:
        shown = param.display_type(ctx)
    except (AttributeError, TypeError):
        shown = getattr(getattr(param, "type", None), "name", "") or ""
    return str(shown).strip("<>") or "-"


def _param_default(param: Any, ctx: Any) -> str:
    if param.required:
        return "required"
    try:
        value = param.get_default(ctx, call=False)
    except TypeError:
        value = param.default
    if callable(value):
        return "(computed)"
    if value is None or value == () or value == []:
        return "-"
    if isinstance(value, bool) and getattr(param, "secondary_opts", None):
        return _code(param.opts[0] if value else param.secondary_opts[0])
    if isinstance(value, bool) and getattr(param, "is_flag", False):
        return "on" if value else "off"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return _code(", ".join(str(v) for v in value))
    return _code(str(value))


def _param_help(param: Any, ctx: Any) -> str:
    help_text = getattr(param, "help", None) or ""
    try:  # the help record adds ranges and choices; default and required have their own columns
        record = param.get_help_record(ctx)
        if record and record[1]:
            help_text = record[1]
    except (AttributeError, TypeError):
        pass
    help_text = re.sub(r"\s*\[(default: [^\]]*|required)\]", "", help_text)
    return _escape(_one_line(help_text), table=True)


def _param_name(param: Any) -> str:
    if getattr(param, "param_type_name", "") == "argument":
        return _code(param.name.upper())
    names = ", ".join(param.opts)
    if getattr(param, "secondary_opts", None):
        names += " / " + ", ".join(param.secondary_opts)
    return _code(names)


def render_cli(root: Any | None = None) -> str:
    """The reference of every command: usage, help and an options table."""
    lines: list[str] = []
    for path, command, ctx in cli_commands(root):
        depth = min(path.count(" ") + 2, 4)
        lines += [f"{'#' * depth} `{path}`", ""]
        # typer writes an argument as {name}; NAME, as the pages do
        pieces = command.collect_usage_pieces(ctx)
        usage = " ".join([path, *(re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), p) for p in pieces)])
        lines += ["```text", usage, "```", ""]
        help_text = inspect.cleandoc(command.help or "")
        help_text = help_text.split("\f")[0].replace("\b\n", "")
        for paragraph in help_text.split("\n\n"):
            if paragraph.strip():
                lines += [_escape(_one_line(paragraph)), ""]
        params = [p for p in command.params if not getattr(p, "hidden", False) and p.name != "help"]
        if params:
            lines += ["| argument / option | type | default | description |", "|---|---|---|---|"]
            for param in params:
                row = [
                    _param_name(param),
                    _escape(_param_type(param, ctx), table=True),
                    _param_default(param, ctx),
                    _param_help(param, ctx),
                ]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        if hasattr(command, "list_commands"):
            subs = [(name, command.get_command(ctx, name)) for name in command.list_commands(ctx)]
            subs = [(n, s) for n, s in subs if s is not None and not getattr(s, "hidden", False)]
            if subs:
                lines += ["| command | what it does |", "|---|---|"]
                for name, sub in subs:
                    anchor = _slug(f"{path} {name}")
                    short = sub.get_short_help_str(limit=200) if hasattr(sub, "get_short_help_str") else ""
                    lines.append(
                        f"| [`{path} {name}`](#{anchor}) | {_escape(_one_line(short), table=True)} |"
                    )
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _slug(text: str) -> str:
    """The heading id Python-Markdown's toc gives a heading of this text."""
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


# ------------------------------------------------------------------------------------------------ configs


def _models_in(module_name: str) -> list[type]:
    """The pydantic models defined in a module (or in the submodules of a package), in source order."""
    from pydantic import BaseModel

    module = importlib.import_module(module_name)
    modules = [module]
    if hasattr(module, "__path__"):  # a package: its submodules too
        for info in pkgutil.walk_packages(module.__path__, module_name + "."):
            modules.append(importlib.import_module(info.name))
    found: dict[type, None] = {}
    for mod in modules:
        for value in vars(mod).values():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseModel)
                and value is not BaseModel
                and (value.__module__ == module_name or value.__module__.startswith(module_name + "."))
                and not value.__name__.startswith("_")
            ):
                found[value] = None

    def source_line(model: type) -> tuple[str, int]:
        try:
            return (model.__module__, inspect.getsourcelines(model)[1])
        except (OSError, TypeError):
            return (model.__module__, 0)

    return sorted(found, key=source_line)


def _nested_models(annotation: Any) -> list[type]:
    """The pydantic models an annotation refers to (through unions, lists, dicts, Annotated, ...)."""
    from pydantic import BaseModel

    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type] = []
    for arg in typing.get_args(annotation):
        for model in _nested_models(arg):
            if model not in out:
                out.append(model)
    return out


def _type_text(annotation: Any, anchors: dict[type, str]) -> str:
    """A field's type, readable: ``int | None``, ``list[str]``, ``'a' | 'b'``; models link to their table."""
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "None"
    if annotation is typing.Any:
        return "any"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        name = annotation.__name__
        return f"[{name}](#{anchors[annotation]})" if annotation in anchors else name
    if origin is typing.Annotated:
        return _type_text(args[0], anchors)
    if origin is typing.Literal:
        return " \\| ".join(_code(str(a) if not isinstance(a, str) else a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_text(a, anchors) for a in args)
    if origin in (list, tuple, set, frozenset, dict):
        inner = ", ".join(_type_text(a, anchors) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if inspect.isclass(annotation):
        if issubclass(annotation, enum.Enum):
            return " \\| ".join(_code(str(m.value)) for m in annotation)
        return {"str": "str", "int": "int", "float": "float", "bool": "bool"}.get(
            annotation.__name__, annotation.__name__
        )
    return _escape(str(annotation).replace("typing.", ""), table=True)


def _plain(value: Any) -> Any:
    """A default as plain data: models as the mapping of their non-default fields, enums as their values."""
    if hasattr(value, "model_dump"):
        return {k: _plain(v) for k, v in value.model_dump(by_alias=True, exclude_defaults=True).items()}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def _flow(value: Any) -> str:
    """A value as YAML flow text, as one would write it in a config."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (value == "" or re.search(r"[:,\[\]{}#]\s|^[\s\[{]|\s$", value)):
        return "'" + value.replace("'", "''") + "'"  # YAML single quotes: no escapes
    return str(value)


def _default_text(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:  # a factory that takes the validated data
            return "(computed)"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "-"
    value = _plain(value)
    if value == {} and hasattr(field.annotation, "model_fields"):
        return "its defaults"
    return _code(_flow(value))


_CONSTRAINTS = {
    "gt": ">",
    "ge": ">=",
    "lt": "<",
    "le": "<=",
    "min_length": "length >=",
    "max_length": "length <=",
}


def _constraint_text(field: Any) -> str:
    found = []
    for item in field.metadata:
        for attr, symbol in _CONSTRAINTS.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return ", ".join(found)


def _model_table(model: type, anchors: dict[type, str]) -> list[str]:
    lines: list[str] = []
    doc = inspect.cleandoc(vars(model).get("__doc__") or "")  # its own docstring, not BaseModel's
    if doc:
        for paragraph in doc.split("\n\n"):
            lines += [_escape(_one_line(_rst_to_md(paragraph))), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        description = _one_line(_rst_to_md(field.description or ""))
        constraint = _constraint_text(field)
        if constraint:
            description = f"{description} ({constraint})" if description else constraint
        row = [
            f"`{key}`",
            _type_text(field.annotation, anchors),
            _default_text(field),
            _escape(description, table=True),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


class ConfigRenderer:
    """Renders the models of one page; a model shown once on the page is linked from then on."""

    def __init__(self) -> None:
        self.anchors: dict[type, str] = {}

    def render(self, module_name: str, names: list[str] | None = None) -> str:
        models = _models_in(module_name)
        if names:
            by_name = {m.__name__: m for m in models}
            missing = [n for n in names if n not in by_name]
            if missing:
                raise ValueError(f"rpsft:config {module_name}: no pydantic model named {', '.join(missing)}")
            roots = [by_name[n] for n in names]
        else:  # the models no other model of the module nests come first
            nested = {
                inner
                for m in models
                for f in m.model_fields.values()
                for inner in _nested_models(f.annotation)
            }
            roots = [m for m in models if m not in nested] + [m for m in models if m in nested]
        order: list[type] = []
        queue = list(roots)
        while queue:  # breadth first: a model, then the models its fields nest
            model = queue.pop(0)
            if model in order or model in self.anchors:
                continue
            order.append(model)
            for field in model.model_fields.values():
                queue += [m for m in _nested_models(field.annotation) if m not in order]
        for model in order:
            self.anchors[model] = f"config-{model.__name__.lower()}"
        lines: list[str] = []
        for model in order:
            lines += [f"### {model.__name__} {{ #{self.anchors[model]} }}", ""]
            lines.append(f"*Defined in `{model.__module__}`.*")
            lines.append("")
            lines += _model_table(model, self.anchors)
        return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ the hook


def fill(markdown: str) -> str:
    """The page's Markdown with every placeholder replaced by the generated reference."""
    if "rpsft:" not in markdown:
        return markdown
    renderer = ConfigRenderer()
    root: list[Any] = []

    def replace(match: re.Match[str]) -> str:
        args = match.group("args").split()
        if match.group("kind") == "methods":
            return importlib.import_module(METHOD_TABLE).methods_markdown().rstrip() + "\n"
        if match.group("kind") == "cli":
            if not root:
                root.append(_load_app())
            return render_cli(root[0])
        if not args:
            raise ValueError("rpsft:config needs a module, e.g. <!-- rpsft:config rpsft.core.config -->")
        return renderer.render(args[0], args[1:])

    return PLACEHOLDER.sub(replace, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return fill(markdown)


def on_config(config: Any) -> Any:
    """Make the repository importable (``rpsft``) when mkdocs runs from an environment without it installed."""
    import sys

    root = str(Path(config["config_file_path"]).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config
