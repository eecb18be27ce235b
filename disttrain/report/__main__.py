"""`python -m disttrain.report RUN_DIR`: re-draws a run's training figure and prints its summary."""

import sys

from disttrain.report.history import main

if __name__ == "__main__":
    sys.exit(main())
