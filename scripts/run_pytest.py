"""pytest that SIGINT stops however it was started: a shell that is not interactive starts a
background job with SIGINT ignored, bash cannot undo that and Python keeps it, so Ctrl-C or
``kill -INT`` did nothing to ``scripts/test`` run that way. Arguments go to pytest."""

import signal
import sys

import pytest

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(pytest.main(sys.argv[1:]))
