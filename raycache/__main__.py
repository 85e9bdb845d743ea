import sys

from raycache.cli import main

sys.exit(main())
