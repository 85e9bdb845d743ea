import sys

from raycache.cli import main

if __name__ == "__main__":  # not on import (a multiprocessing child re-imports a program's main module)
    sys.exit(main())
