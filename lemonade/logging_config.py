"""Logging set-up of the server process (C++ HEAD `server/logging_config.cpp`)."""
from __future__ import annotations

import sys


def configure_logging(level: str) -> None:
    """Log to stdout at `level`; an unknown level (the C++ client passes it on unchecked) means info."""
    import logging

    numeric = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
               "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}.get(level, logging.INFO)
    logging.basicConfig(level=numeric, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if numeric > logging.DEBUG:
        logging.getLogger("urllib3").setLevel(logging.WARNING)
