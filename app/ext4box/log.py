"""structlog configuration shared by every command: which format, which level.

JSON lines with `--log-format json` (or EXT4BOX_LOG_FORMAT=json, which the
container image sets) and when stderr is not a terminal (services, tests,
pipes); on a terminal, one short human line per event, and only warnings and
errors unless a level is asked for: a command's own output is what the user
came for.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_LEVEL = "info"
FORMATS = ("auto", "json", "human")
TERMINAL_LEVEL = "warning"  # a terminal's default, whatever the command's default


def resolve_level(cli_level: str | None) -> str:
    """--log-level wins over EXT4BOX_LOG_LEVEL, which wins over the default."""
    level = (cli_level or os.environ.get("EXT4BOX_LOG_LEVEL") or DEFAULT_LEVEL).lower()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (choose from {', '.join(LEVELS)})")
    return level


def resolve_format(cli_format: str | None = None) -> str:
    """"json" or "human": --log-format wins over EXT4BOX_LOG_FORMAT, then "auto"."""
    fmt = (cli_format or os.environ.get("EXT4BOX_LOG_FORMAT") or "auto").lower()
    if fmt in ("console", "text"):
        fmt = "human"
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "auto":
        return "human" if sys.stderr.isatty() else "json"
    return fmt


def wants_json(cli_format: str | None = None) -> bool:
    return resolve_format(cli_format) == "json"


def render_human(_logger: object, method: str, event_dict: dict[str, object]) -> str:
    """`ext4box: warning: event key=value ...`: the shape of our error lines."""
    event_dict.pop("timestamp", None)
    level = event_dict.pop("level", method)
    event = event_dict.pop("event", "")
    event_dict.pop("logger", None)
    failure = _exception_of(event_dict.pop("exc_info", None))
    event_dict.pop("exception", None)
    if failure is not None:  # the exception's one line, never a traceback
        event_dict["error"] = f"{type(failure).__name__}: {failure}"
    details = " ".join(f"{key}={value}" for key, value in event_dict.items())
    return f"ext4box: {level}: {event}" + (f" ({details})" if details else "")


def _exception_of(exc_info: object) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        return exc_info[1]
    return sys.exc_info()[1] if exc_info else None


def setup(level: str | None = None, fmt: str | None = None) -> None:
    """Configure structlog (and stdlib logging, which pyfuse3 uses) once per process."""
    numeric = getattr(logging, resolve_level(level).upper())
    as_json = wants_json(fmt)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        renderer: structlog.types.Processor = structlog.processors.JSONRenderer()
        # Structured tracebacks, without frame locals: they are noisy and could
        # carry file contents into the log.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    else:
        renderer = render_human
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # pyfuse3 logs through the stdlib: send it to stderr at the same level,
    # rendered by the same structlog renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
