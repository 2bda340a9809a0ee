"""The broker with uvicorn's stock protocols, as it served before issue 10: httptools with no
head deadline or size limit, websockets-sansio answering every PING straight away. Otherwise
it runs as `tablelock serve` does (same app, logging and server class). Only the abuse
benchmark runs it, for its "before" figures (bench/abuse.py).

    python -m bench.baselines.unguarded --port P
"""

from __future__ import annotations

import argparse

import uvicorn

from tablelock import logs
from tablelock.app import create_app
from tablelock.cli import DrainingServer, uvicorn_options
from tablelock.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    settings = Settings.from_env(port=parser.parse_args().port)
    logs.setup()
    app = create_app(settings)
    options = {**uvicorn_options(settings), "http": "httptools", "ws": "websockets-sansio"}
    config = uvicorn.Config(app, **options)  # type: ignore[arg-type]
    DrainingServer(config, app.state.gateway, settings.drain_window_s).run()


if __name__ == "__main__":
    main()
