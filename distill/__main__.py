"""``python -m distill`` runs the ``distill`` command line."""

from distill.cli import main

if __name__ == "__main__":
    main()
