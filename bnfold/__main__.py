"""``python -m bnfold``: the command line."""

from bnfold.cli import main

if __name__ == "__main__":
    main()
