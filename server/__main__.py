"""Start the server: ``python -m server [flags]``; every flag also reads a ``PEO_*`` variable."""

from __future__ import annotations

import logging
import sys

import uvicorn

from peo_merge.bundle import BundleError
from server.app import create_app
from server.engine import Engine
from server.logs import configure_logging
from server.settings import load_settings

logger = logging.getLogger("server")


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_json)
    try:
        engine = Engine(settings)
    except (BundleError, FileNotFoundError, ValueError) as error:
        logger.error("start-up failed: %s", error)
        return 2

    app = create_app(settings, engine)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
