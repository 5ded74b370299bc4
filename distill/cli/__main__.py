"""``python -m distill.cli`` (what ``accelerate launch -m distill.cli`` runs)."""

from distill.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
