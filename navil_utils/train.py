"""Command line: ``python -m navil_utils.train`` trains the embedded tiny NaViL (see :mod:`navil_utils.tiny.train`)."""
import sys

from navil_utils.tiny.train import main

if __name__ == "__main__":
    sys.exit(main())
