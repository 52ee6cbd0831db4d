"""HTTP front of :class:`mining.service.MiningService` (FastAPI; run with uvicorn).

``POST /v1/mine`` (body: :class:`MineRequest`) -> ``{"version", "results": [MineResult...]}``;
``GET /v1/status``; ``GET /v1/health``; ``POST /v1/refresh`` (``{"checkpoint_path"?, "block"?, "catch_up"?}``).
Endpoints are plain ``def`` so FastAPI runs them in its thread pool: a search never blocks the event
loop, and a refresh runs in the service's own background thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from mining.service import MineRequest, MiningRequestError, MiningService


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint_path: str | None = None
    block: bool = False
    catch_up: bool = False  # a refresh asked for while one runs is built right after it (not dropped)


def create_app(service: MiningService) -> FastAPI:
    app = FastAPI(title="negatron mining service", version="1")
    app.state.service = service

    @app.exception_handler(MiningRequestError)
    def _bad_request(_: Request, exc: MiningRequestError):
        return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})

    @app.get("/v1/health")
    def health() -> dict:
        return {"ok": True, "version": service.version}

    @app.get("/v1/status")
    def status() -> dict:
        return service.status()

    @app.post("/v1/mine")
    def mine(req: MineRequest) -> dict:
        results = service.mine_request(req)
        return {"version": results[0].version, "results": [r.to_dict() for r in results]}

    @app.post("/v1/refresh")
    def refresh(req: RefreshRequest) -> dict:
        started = service.refresh(req.checkpoint_path, block=req.block, catch_up=req.catch_up)
        return {"started": started, **service.status()}

    return app


def serve(service: MiningService, host: str = "127.0.0.1", port: int = 8765, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def serve_in_thread(service: MiningService, host: str = "127.0.0.1", port: int = 0,
                    startup_timeout: float = 30.0) -> Iterator[str]:
    """Run the server in a background thread (tests, single-process setups); yields its base URL and
    stops it on exit. ``port=0`` picks a free port."""
    import socket

    import uvicorn

    if port == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="mining-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"mining server did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
