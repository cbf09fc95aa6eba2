"""`python -m picochat ...` is the same CLI as `picochat ...` (and works under `torchrun -m picochat`)."""

import sys

from picochat.cli import main

if __name__ == "__main__":
    sys.exit(main())
