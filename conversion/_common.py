"""What both conversion scripts share: the process group and clean failure on bad input."""

from __future__ import annotations

import sys
from typing import Callable

EXPECTED = (FileNotFoundError, FileExistsError, ValueError)


def run(main: Callable[[], None]) -> None:
    """Run ``main``; a bad input ends the process with its message and status 2, no traceback."""
    try:
        main()
    except EXPECTED as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
