"""Logging of the serving processes (router, compute replica, prefetch worker, CLI).

Every line names its request when it has one: pass `extra=rid(request_id)`; lines without
one show "-". Prompts and outputs are never logged at INFO or above (token counts only).
The level comes from `ServeConfig.log_level` (env `ALIGNEDSERVE_LOG_LEVEL`).
"""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class _RequestIdDefault(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return True


def rid(request_id: str) -> dict[str, str]:
    """`extra=` for a line about one request."""
    return {"request_id": request_id}


def configure_logging(level: str = "INFO") -> logging.Logger:
    """Install the "alignedserve" logger's handler in this process (idempotent)."""
    root = logging.getLogger("alignedserve")
    if not any(getattr(h, "_alignedserve", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_RequestIdDefault())
        handler._alignedserve = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level.upper())
    return root
