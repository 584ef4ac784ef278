"""Output shared by the benchmark scripts: a JSON report with its date and command."""

from __future__ import annotations

import datetime
import json
import logging
import pathlib
import shlex
import sys
from collections.abc import Sequence
from typing import Any


def command_line(module: str, argv: Sequence[str]) -> str:
    """Return the shell command that reruns ``python -m module`` with ``argv``."""
    return shlex.join([sys.executable, "-m", module, *argv])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_report(result: dict[str, Any], out: pathlib.Path | None, logger: logging.Logger) -> None:
    """Write ``result`` as indented JSON to ``out``, or print it when ``out`` is None."""
    text = json.dumps(result, indent=2)
    if out is None:
        print(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    logger.info("Wrote %s", out)
