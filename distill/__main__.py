"""``python -m distill`` runs the ``distill`` command line."""

from distill.cli import console_main

if __name__ == "__main__":
    console_main()
