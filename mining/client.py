"""HTTP client for the mining server with the same methods as the in-process
:class:`mining.service.MiningService` (``mine``, ``status``, ``refresh``, ``close``), so a trainer can
take either."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mining.service import MineRequest, MineResult, MiningRequestError


class MiningClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8765", timeout: float = 60.0):
        import httpx

        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)

    def _call(self, method: str, path: str, json: dict | None = None) -> dict:
        response = self._http.request(method, path, json=json)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise MiningRequestError(f"{method} {path} -> {response.status_code}: {detail}", status_code=response.status_code)
        return response.json()

    def mine(self, queries: Sequence[str] | None = None, query_ids: Sequence[str] | None = None, **options) -> list[MineResult]:
        # Validate locally first: the same errors as in process, without a round trip.
        req = MineRequest(queries=list(queries) if queries is not None else None,
                          query_ids=list(query_ids) if query_ids is not None else None, **options)
        body = self._call("POST", "/v1/mine", req.model_dump(exclude_none=True))
        return [MineResult.from_dict(r) for r in body["results"]]

    def status(self) -> dict:
        return self._call("GET", "/v1/status")

    def health(self) -> dict:
        return self._call("GET", "/v1/health")

    @property
    def version(self) -> int:
        return int(self.status()["version"])

    def refresh(self, checkpoint_path: str | Path | None = None, block: bool = False, catch_up: bool = False) -> bool:
        body = {"checkpoint_path": str(checkpoint_path) if checkpoint_path is not None else None, "block": block,
                "catch_up": catch_up}
        return bool(self._call("POST", "/v1/refresh", body)["started"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "MiningClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
