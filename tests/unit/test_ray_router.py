"""The Ray Serve session router's choices, without a cluster (fake replicas and requests):

* an ``open`` ranks replicas by free session slots;
* a session's later calls go to its open's replica; a call this router did not open goes to the
  replica whose routing stats list the session;
* a call of a session no replica lists yet (stats lag a new stream) waits, with Ray's backoff,
  for up to ``UNKNOWN_SESSION_WAIT_S``, then goes to any replica (which answers ``no_session``);
* a call whose own replica left the candidates fails at once on any replica.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve.request_router")

from flashdreams.serve import ray_router  # noqa: E402
from flashdreams.serve.ray_router import SessionRouter  # noqa: E402


def _router(max_sessions: int = 2) -> SessionRouter:
    router = SessionRouter.__new__(SessionRouter)  # no Ray controller: only the routing state
    router.initialize_state(max_sessions=max_sessions)
    return router


def _replica(name: str, sessions=(), active: int = 0):
    return SimpleNamespace(replica_id=name,
                           routing_stats={"sessions": list(sessions), "active_sessions": active})  # fmt: skip


def _request(method: str, session: str | None, rid: str):
    meta = SimpleNamespace(call_method=method, session_id=session, internal_request_id=rid)
    return SimpleNamespace(metadata=meta, routing_context=SimpleNamespace(should_backoff=False))


def _choose(router, replicas, request):
    return asyncio.run(router.choose_replicas(replicas, request))


def test_open_ranks_by_free_slots_and_calls_follow_their_open():
    router = _router()
    a, b = _replica("a", active=1), _replica("b")
    opened = _request("open", "s1", "r1")
    assert _choose(router, [a, b], opened) == [[b], [a]]
    router.on_request_routed(opened, "b", None)
    assert _choose(router, [a, b], _request("message", "s1", "r2")) == [[b]]
    assert _choose(router, [a, b], _request("status", None, "r3")) == [[a, b]]
    router.on_request_completed("b", "r1")  # the stream ended: its calls are unknown now
    assert "s1" not in router.owner


def test_a_session_another_router_opened_goes_where_the_stats_list_it():
    router = _router()
    a, b = _replica("a"), _replica("b", sessions=["s9"])
    assert _choose(router, [a, b], _request("message", "s9", "r1")) == [[b]]


def test_an_unlisted_session_waits_for_the_stats_then_fails_on_any_replica(monkeypatch):
    router = _router()
    now = [100.0]
    monkeypatch.setattr(ray_router.time, "monotonic", lambda: now[0])
    a, b = _replica("a"), _replica("b")
    request = _request("message", "s2", "r1")
    assert _choose(router, [a, b], request) == []  # Ray backs off and asks again
    assert request.routing_context.should_backoff
    now[0] += 1.0
    b.routing_stats["sessions"] = ["s2"]  # the stats caught up with the new stream
    assert _choose(router, [a, b], request) == [[b]]
    assert router.waiting == {}
    late = _request("message", "s3", "r2")  # a session nobody has
    assert _choose(router, [a, b], late) == []
    now[0] += ray_router.UNKNOWN_SESSION_WAIT_S + 0.1
    assert _choose(router, [a, b], late) == [[a, b]]  # any replica: it answers no_session
    assert router.waiting == {}


def test_a_call_whose_replica_left_fails_at_once():
    router = _router()
    opened = _request("open", "s1", "r1")
    router.on_request_routed(opened, "gone", None)
    a = _replica("a")
    assert _choose(router, [a], _request("message", "s1", "r2")) == [[a]]
    assert router.waiting == {}
