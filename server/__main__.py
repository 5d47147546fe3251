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
from server.threads import run_in_new_thread

logger = logging.getLogger("server")


class DrainingServer(uvicorn.Server):
    """A uvicorn server that, on SIGINT or SIGTERM, also drains running generations.

    uvicorn stops accepting connections and waits for open ones; the server state additionally
    rejects new requests with 503 and ends streams that outlive the grace period.
    """

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self.draining = False

    def handle_exit(self, sig, frame) -> None:
        if not self.draining:
            self.draining = True
            self.state.begin_shutdown()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutdown, which would end the process with
        # -SIGTERM; a drained shutdown is a clean exit, so the process returns 0 instead.
        self._captured_signals.clear()


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_level, settings.log_json)
    try:
        # loading runs tensor work; its thread exits, so the decode loop is the only long-lived
        # thread with a team of OpenMP workers (see server.threads)
        engine = run_in_new_thread(Engine, settings, name="start-up")
    except (BundleError, OSError, ValueError) as error:
        logger.error("start-up failed: %s", error)
        return 2
    except Exception as error:
        # an unexpected error, so the log gets its traceback too
        logger.exception("start-up failed: %s: %s", type(error).__name__, error)
        return 2

    app = create_app(settings, engine)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
    )
    DrainingServer(config, app.state.server).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
