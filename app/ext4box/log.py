"""structlog configuration shared by every command.

JSON lines when stderr is not a terminal (services, tests, containers) or when
EXT4BOX_LOG_FORMAT=json; a human-readable console rendering on a terminal.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_LEVEL = "info"


def resolve_level(cli_level: str | None) -> str:
    """--log-level wins over EXT4BOX_LOG_LEVEL, which wins over the default."""
    level = (cli_level or os.environ.get("EXT4BOX_LOG_LEVEL") or DEFAULT_LEVEL).lower()
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (choose from {', '.join(LEVELS)})")
    return level


def wants_json() -> bool:
    fmt = os.environ.get("EXT4BOX_LOG_FORMAT", "").lower()
    if fmt == "json":
        return True
    if fmt in ("console", "text"):
        return False
    return not sys.stderr.isatty()


def setup(level: str | None = None) -> None:
    """Configure structlog (and stdlib logging, which pyfuse3 uses) once per process."""
    numeric = getattr(logging, resolve_level(level).upper())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if wants_json():
        renderer: structlog.types.Processor = structlog.processors.JSONRenderer()
        # Structured tracebacks, without frame locals: they are noisy and could
        # carry file contents into the log.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
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
