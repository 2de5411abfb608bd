"""Outbound FHIR: a transaction Bundle POSTed to the server's base URL (FHIR R4 3.1.0.11), over a kept client.

2xx: delivered (a transaction is all or nothing, so the Bundle's own entries need no second look). 408, 429, 5xx,
connection failures and timeouts: the server may take it later, retry with backoff. Any other 4xx: the server
refused this Bundle; the destination's on_client_error says whether trying again can help (dead by default).
"""

from __future__ import annotations

import httpx

from engine.channels.attempt import Attempt
from engine.config import FhirDestination

FHIR_JSON = "application/fhir+json; charset=utf-8"
TRANSIENT = {408, 425, 429}


class FhirSender:
    """Sends one destination's Bundles in order; the dispatcher calls it sequentially."""

    def __init__(self, destination: FhirDestination) -> None:
        self.destination = destination
        self.url = destination.url.rstrip("/")
        timeout = httpx.Timeout(destination.response_timeout_seconds, connect=destination.connect_timeout_seconds)
        self.client = httpx.AsyncClient(timeout=timeout, headers={
            "Content-Type": FHIR_JSON, "Accept": "application/fhir+json", **destination.headers})

    async def send(self, payload: bytes) -> Attempt:
        try:
            response = await self.client.post(self.url, content=payload)
        except httpx.TimeoutException:
            return Attempt(False, error="no answer from the FHIR server within the timeout")
        except httpx.HTTPError as exc:
            return Attempt(False, error=f"connection failed: {exc.__class__.__name__}: {exc}")
        answer = f"HTTP {response.status_code} {response.text[:3900]}"
        if response.is_success:
            return Attempt(True, response=answer)
        if response.status_code < 500 and response.status_code not in TRANSIENT:
            return Attempt(False, response=answer, error=f"FHIR server refused the Bundle: HTTP {response.status_code}",
                           retry=self.destination.on_client_error == "retry")
        return Attempt(False, response=answer, error=f"FHIR server answered HTTP {response.status_code}")

    async def close(self) -> None:
        await self.client.aclose()
