"""`python -m distill` is the same as the `ecg-distill` command."""

from distill.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
