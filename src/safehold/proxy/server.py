"""The encryption proxy process: :mod:`safehold.proxy.http` under uvicorn (``safehold proxy``)."""

from __future__ import annotations

import uvicorn

from safehold.proxy.core import Protector
from safehold.proxy.http import create_app

__all__ = ["serve"]


def serve(protector: Protector, upstream: str, host: str, port: int) -> None:
    """Run the proxy with uvicorn on ``host:port`` in front of ``upstream`` until interrupted
    (blocking)."""
    uvicorn.run(create_app(protector, upstream), host=host, port=port, log_level="warning")
