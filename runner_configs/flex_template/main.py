"""Flex Template launcher entry point: the streaming job's own command line, unchanged."""

import sys

from pipelines.streaming import main

if __name__ == "__main__":
    sys.exit(main())
