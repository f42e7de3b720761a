"""lemonade: a Python port of Lemonade Server (upstream lemonade-sdk/lemonade, C++ GA 61dda2d04)."""

# The version the C++ binary of the mirrored commit reports (cli.md §2: `lemonade-router version 9.0.2`).
# Scripts that parse `--version` keep working against the port.
__version__ = "9.0.2"
