import sys

from raycache.cli import main

if __name__ == "__main__":  # a spawned child process (`raycache.models.preflight`) imports this module too
    sys.exit(main())
