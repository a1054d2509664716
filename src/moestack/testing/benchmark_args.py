"""The ``--smoke`` flag every benchmark shares: the test suite runs each benchmark at its
smallest size, so that none can rot unnoticed."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

SMOKE_HELP = "smallest size (the test suite's run)"


def parse_with_smoke(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                     smoke: Mapping[str, Any], help: str = SMOKE_HELP) -> argparse.Namespace:
    """Parse ``argv`` with a ``--smoke`` flag added to ``parser``: with it, ``smoke`` replaces the
    defaults (flags given explicitly still win)."""
    parser.add_argument("--smoke", action="store_true", help=help)
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args
