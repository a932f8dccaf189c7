"""The Fleet gateway's filter: Flower's Fleet routes pass, Control and Runtime never do.

The gateway in front of a real SuperLink is tested in test_control_access_e2e.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from flwr.supercore.routers.runtime.router import router as runtime_router
from flwr.superlink.routers.control.router import router as control_router

from fedpeft.errors import ConfigError
from fedpeft.flower.fleet_gateway import FLEET_PATHS, FleetGateway, is_fleet_request, serve
from fedpeft.flower.local_federation import free_port


def paths(router) -> set[str]:
    return {route.path for route in router.routes if isinstance(route, APIRoute)}


def test_the_gateway_forwards_exactly_flowers_fleet_routes() -> None:
    assert {"/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/v1/fleet/push-object"} <= FLEET_PATHS
    assert all(path.startswith("/v1/fleet/") for path in FLEET_PATHS)
    control, runtime = paths(control_router), paths(runtime_router)
    assert "/v1/control/register-node" in control and "/v1/control/start-run" in control
    assert "/v1/runtime/acquire-task" in runtime
    for path in control | runtime:
        assert not is_fleet_request("POST", path.encode(), b""), path


@pytest.mark.parametrize(
    ("method", "raw_path", "query"),
    [
        ("GET", b"/v1/fleet/pull-messages", b""),
        ("POST", b"/v1/fleet/pull-messages", b"x=1"),
        ("POST", b"/v1/fleet/pull-messages/", b""),
        ("POST", b"/v1/fleet/../control/start-run", b""),
        ("POST", b"/v1/fleet/%2e%2e/control/register-node", b""),
        ("POST", b"//v1/fleet/pull-messages", b""),
        ("POST", b"/V1/FLEET/PULL-MESSAGES", b""),
        ("POST", b"/docs", b""),
        ("POST", b"/health", b""),
    ],
)
def test_anything_but_an_exact_fleet_route_is_refused(method: str, raw_path: bytes, query: bytes) -> None:
    assert is_fleet_request("POST", b"/v1/fleet/pull-messages", b"")
    assert not is_fleet_request(method, raw_path, query)


def test_a_refused_request_never_reaches_the_superlink(tmp_path: Path) -> None:
    # The upstream is a closed port: a forwarded request comes back 502, a refused one
    # is answered 403 by the gateway itself.
    gateway = FleetGateway(f"127.0.0.1:{free_port()}", tmp_path / "unused-ca.crt")

    async def outsider_calls() -> list[int]:
        gateway._client = httpx.AsyncClient(base_url=f"http://{gateway.superlink}")  # fails before TLS
        transport = httpx.ASGITransport(app=gateway, client=("203.0.113.9", 4242))
        async with httpx.AsyncClient(transport=transport, base_url="https://fl.example.org") as outsider:
            refused = await outsider.post("/v1/control/register-node", content=b"\x0a\x01k")
            assert "Fleet API only" in refused.text
            codes = [refused.status_code]
            codes.append((await outsider.post("/v1/runtime/acquire-task", content=b"")).status_code)
            codes.append((await outsider.get("/v1/fleet/pull-messages")).status_code)
            codes.append((await outsider.post("/v1/fleet/pull-messages", content=b"")).status_code)
        await gateway._client.aclose()
        return codes

    assert asyncio.run(outsider_calls()) == [403, 403, 403, 502]


def test_serve_names_a_missing_certificate_and_a_port_clash(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.key not found"):
        (tmp_path / "ca.crt").write_text("x")
        (tmp_path / "server.crt").write_text("x")
        serve("127.0.0.1", 9092, "127.0.0.1:9093", tmp_path)
    (tmp_path / "server.key").write_text("x")
    with pytest.raises(ConfigError, match="SuperLink's own address"):
        serve("127.0.0.1", 9093, "127.0.0.1:9093", tmp_path)
