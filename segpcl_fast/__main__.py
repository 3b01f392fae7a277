"""`python -m segpcl_fast ...`: the CLI (segpcl_fast.cli, also `segpcl-fast` and `python -m segpcl_fast.cli`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
