"""Logging and console output of the server process (C++ HEAD `server/logging_config.cpp`)."""
from __future__ import annotations

import sys


def configure_logging(level: str, log_file: str | None = None) -> None:
    """Log to stdout at `level`, or append to `log_file` (`serve --log-file`) instead; an unknown level
    (the C++ client passes it on unchecked) means info. Raises OSError when `log_file` cannot be opened.

    Called by every server entry point (`lemonade-router`, `serve`, `run`) before the first console line.
    stdout and stderr become line-buffered, so each line reaches a pipe as it is printed, as C++ ends
    every console line with `std::endl`. Without this a piped stdout is block-buffered (8 KiB) and a
    parent reading it line by line waits for lines already printed."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a TextIOWrapper; not when a test harness replaced it
            stream.reconfigure(line_buffering=True)
    numeric = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
               "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}.get(level, logging.INFO)
    if log_file:
        handler: logging.Handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stdout)
    logging.basicConfig(level=numeric, handlers=[handler],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if numeric > logging.DEBUG:
        logging.getLogger("urllib3").setLevel(logging.WARNING)


def print_line(text: str, file=None) -> None:
    """Write `text` and its newline in one call, then flush: the console lines of a running server.

    `print()` writes the text and the newline separately, and the server's threads log to the same
    stdout, so a log record can land between the two and glue itself onto a console line that a parent
    is waiting for (e.g. `Shutting down server...2025-... INFO ... - 404`). One `write` of a whole line
    cannot be split that way, as `logging.StreamHandler` writes each record. `file` defaults to the
    current `sys.stdout`."""
    stream = file if file is not None else sys.stdout
    stream.write(text + "\n")
    stream.flush()
