"""Black-box parity tests of the HTTP API and the CLI (see harness.py)."""
