"""`python -m lemonade …` is the `lemonade` command (used where the console script may not be on PATH,
e.g. the pytest plugin starts its server with the test interpreter)."""
from lemonade.cli_parser import main_lemonade

if __name__ == "__main__":
    main_lemonade()
