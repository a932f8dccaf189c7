"""The SuperLink's public address: a gateway that serves SuperNodes and nothing else.

Why it exists: Flower 1.41's SuperLink serves three APIs on one HTTPS port (one uvicorn
app): the Fleet API that SuperNodes use, the Control API that ``flwr`` uses (register
SuperNode keys, start and stop runs, read logs) and the Runtime API that the ServerApp
uses (``acquire-task`` hands out the ServerApp's pending task). Without Flower's OIDC
account plugin (enterprise distribution only), Control requests pass a no-op
authentication plugin (``NoOpControlAuthnPlugin`` accepts any caller), and Runtime's
SuperExec check is off in the default subprocess isolation: anyone who completes the TLS
handshake may use both, and the handshake needs only ``ca.crt``, which every device
holds. ``--control-api-address`` no longer separates them (Flower 1.41 marks it
deprecated; the HTTP app serves every router on ``--host``/``--port``).

So ``server/start_superlink.sh`` binds the SuperLink to loopback (the operator's Control
address) and runs this gateway on the public address. It terminates TLS with the
SuperLink's own certificate and forwards exactly the routes of Flower's Fleet router
(``POST /v1/fleet/...``, read from Flower so they follow its version) to the SuperLink;
every other method, path or query string is answered ``403`` and never reaches it. It
adds no authentication of its own: SuperNode keys are still checked by the SuperLink.

Notes:
    The guarantee holds only if nothing else exposes the SuperLink's loopback port
    (every local user of the server machine can reach it, as Flower's own loopback
    defaults assume) and the SuperLink's certificate is valid for the loopback address
    the gateway dials (``server/make_certificates.sh`` always adds ``127.0.0.1``).

"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi.routing import APIRoute
from flwr.superlink.routers.fleet.router import router as fleet_router

from fedpeft.errors import ConfigError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FLEET_PATHS: frozenset[str] = frozenset(
    route.path for route in fleet_router.routes if isinstance(route, APIRoute) and route.methods == {"POST"}
)
"""Every route the gateway forwards: Flower's Fleet router, all ``POST /v1/fleet/...``."""

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
"""Headers of one connection, not of the request (RFC 9110 7.6.1), plus Host."""

log = logging.getLogger("fedpeft.fleet_gateway")


def is_fleet_request(method: str, raw_path: bytes, query_string: bytes) -> bool:
    """Whether a request is one the gateway forwards: a Fleet route, exactly.

    The raw path is compared byte for byte, so percent-encoding or dot segments
    (``/v1/fleet/../control/start-run``) never match a Fleet route by normalising.
    """
    return method == "POST" and not query_string and raw_path.decode("latin-1") in FLEET_PATHS


class FleetGateway:
    """An ASGI app forwarding Fleet API requests to a SuperLink and refusing the rest.

    Args:
        superlink: The SuperLink's (loopback) address, ``HOST:PORT``.
        ca_certfile: The CA that signed the SuperLink's certificate.
        timeout: Seconds a forwarded request may take before the gateway answers 504.

    """

    def __init__(self, superlink: str, ca_certfile: Path, timeout: float = 300.0) -> None:
        self.superlink = superlink
        self.ca_certfile = ca_certfile
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    def _upstream(self) -> httpx.AsyncClient:
        if self._client is None:
            context = ssl.create_default_context(cafile=str(self.ca_certfile))
            self._client = httpx.AsyncClient(
                base_url=f"https://{self.superlink}", verify=context, timeout=self.timeout
            )
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope (``lifespan`` or ``http``)."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # uvicorn runs with ws="none": nothing else arrives
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        if not is_fleet_request(scope["method"], raw_path, scope.get("query_string", b"")):
            client = scope.get("client")
            peer = f"{client[0]}:{client[1]}" if client else "?"
            log.warning(
                "refused %s %r from %s: not a Fleet API route",
                scope["method"],
                raw_path.decode("latin-1"),
                peer,
            )
            await _answer(send, 403, b"this address serves the Flower Fleet API only (SuperNodes)\n")
            return
        await self._forward(scope, raw_path, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._upstream()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, raw_path: bytes, receive: Receive, send: Send) -> None:
        # Content-Length passes through, so httpx streams the body with it; without one
        # httpx sends it chunked.
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]

        async def body() -> AsyncIterator[bytes]:
            more = True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                yield message.get("body", b"")
                more = message.get("more_body", False)

        client = self._upstream()
        request = client.build_request("POST", raw_path.decode("latin-1"), headers=headers, content=body())
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            await _answer(send, 504, b"the SuperLink did not answer in time\n")
            return
        except httpx.TransportError as error:
            log.warning("the SuperLink at %s is unreachable: %s", self.superlink, error)
            await _answer(send, 502, b"the SuperLink is unreachable\n")
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _answer(send: Send, status: int, text: bytes) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(text)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": text, "more_body": False})


def serve(host: str, port: int, superlink: str, certs: Path) -> None:
    """Serve the gateway on ``host:port`` over TLS until interrupted.

    Args:
        host: The public address SuperNodes dial (``0.0.0.0`` for every interface).
        port: Its port.
        superlink: The SuperLink's loopback address, ``HOST:PORT``.
        certs: Folder with ``ca.crt``, ``server.crt`` and ``server.key``.

    Raises:
        ConfigError: A certificate file is missing, or the gateway would listen where
            the SuperLink does.

    """
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (certs / name).is_file():
            raise ConfigError(
                f"fleet gateway: {certs / name} not found (make it with server/make_certificates.sh)"
            )
    if superlink in (f"{host}:{port}", f"[{host}]:{port}"):
        raise ConfigError(f"fleet gateway: --port {port} is the SuperLink's own address {superlink}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet gateway %(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded request
    log.info("serving the Fleet API on %s:%d, forwarding to the SuperLink at %s", host, port, superlink)
    uvicorn.run(
        FleetGateway(superlink, certs / "ca.crt"),
        host=host,
        port=port,
        ssl_certfile=str(certs / "server.crt"),
        ssl_keyfile=str(certs / "server.key"),
        ws="none",
        lifespan="on",
        access_log=False,
        server_header=False,
        date_header=False,
        log_level="warning",
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m fedpeft.flower.fleet_gateway``; started by ``server/start_superlink.sh``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="public address SuperNodes dial")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--superlink", required=True, help="the SuperLink's loopback HOST:PORT")
    parser.add_argument(
        "--certs", type=Path, required=True, help="folder with ca.crt, server.crt, server.key"
    )
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port, args.superlink, args.certs)
    except ConfigError as error:
        print(f"fedpeft: error: {error}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
