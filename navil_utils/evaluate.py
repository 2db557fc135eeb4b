"""Command line: ``python -m navil_utils.evaluate`` scores a checkpoint on the synthetic task
(see :mod:`navil_utils.tiny.evaluate`)."""
import sys

from navil_utils.tiny.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
