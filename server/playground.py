"""The playground page at ``GET /``: one self-contained HTML file streaming from ``/generate``."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

logger = logging.getLogger(__name__)

PLAYGROUND_FILE = Path(__file__).resolve().parent / "static" / "playground.html"
# The page loads nothing from elsewhere: inline style and script, requests to this server only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def register_playground_routes(app: FastAPI) -> None:
    """Serve the playground page at ``GET /``; the file is read once, at start-up."""
    page = PLAYGROUND_FILE.read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    logger.debug("playground page loaded from %s (%d bytes)", PLAYGROUND_FILE, len(page))

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def playground() -> HTMLResponse:
        """Return the playground page."""
        return HTMLResponse(page, headers=headers)
