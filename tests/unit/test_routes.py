"""The HTTP routes stay on the event loop: no route method (BentoML resolves its `self` with a sync dependency) and
no sync dependency anywhere, each of which FastAPI runs in its thread pool, a thread hop per request (README
§ Performance: removing them took cache hits from 1,742 to 2,801 RPS)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

import service
from bench import trivial


def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute, also those of included routers (where BentoML moves the route methods of a class)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        included = getattr(route, "original_router", None)  # FastAPI's wrapper of an `include_router`
        if included is not None:
            yield from api_routes(included.routes)


def calls(dependant: Dependant) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from calls(sub)


def test_no_route_is_a_method_and_no_dependency_runs_in_the_thread_pool() -> None:
    for app, cls in ((service.http, service.QueryRouter), (trivial.http, trivial.Trivial)):
        methods = {m for m in vars(getattr(cls, "inner", cls)).values() if callable(m)}
        routes = list(api_routes(app.routes))
        assert {r.path for r in routes} >= {"/health/ready", "/v1/query-classify"}
        for route in routes:
            assert route.endpoint not in methods, route.path
            assert inspect.iscoroutinefunction(route.endpoint), route.path
            sync = [c for c in calls(route.dependant) if not inspect.iscoroutinefunction(c)]
            assert not sync, f"{route.path}: {sync}"
