"""Logging and console output of the server process (C++ HEAD `server/logging_config.cpp`).

Every record is one line: control characters in a message (CR, LF, the other C0 codes, DEL, C1, and
U+2028/U+2029) are written as escapes (`\\r`, `\\n`, `\\x1b`, `\\u2028`), so a request value that
reaches the log (a URL with `%0d%0a`, a model name) cannot forge a line; traceback lines are indented,
so none of them can pass for a record either.
"""
from __future__ import annotations

import re
import sys

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` with every control character as a visible escape; printable text is unchanged (a
    backslash stays one backslash, so escaping twice changes nothing more)."""
    return _CONTROL.sub(_escape_one, text) if _CONTROL.search(text) else text


def _escape_one(match: re.Match) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def one_line_formatter(fmt: str | None = None):
    """A `logging.Formatter` whose records cannot span or forge lines (see the module docstring).
    Built on first use, so importing this module does not import `logging` (CLI start-up time)."""
    import logging

    global _formatter_class
    if _formatter_class is None:
        class OneLineFormatter(logging.Formatter):
            def formatMessage(self, record: logging.LogRecord) -> str:
                record.message = escape_controls(record.message)
                return super().formatMessage(record)

            def formatException(self, ei) -> str:
                return _indented(super().formatException(ei))

            def formatStack(self, stack_info: str) -> str:
                return _indented(super().formatStack(stack_info))

        _formatter_class = OneLineFormatter
    return _formatter_class(fmt or LOG_FORMAT)


_formatter_class = None


def _indented(text: str) -> str:
    return "\n".join("  " + escape_controls(line) for line in text.split("\n"))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    handler.setFormatter(one_line_formatter())
    logging.basicConfig(level=numeric, handlers=[handler])
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
