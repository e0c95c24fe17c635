"""Ray Serve request router of the generator deployment: sessions stick to their replica.

Every call of the ingress to the generator carries ``session_id`` (Ray Serve's own request
metadata, ``handle.options(session_id=...)``). An ``open`` call (a stream's ``start``) goes to
the replica with the most free session slots; every later call of that session (``message``,
``close``) goes to the replica its ``open`` went to, for as long as that ``open`` runs (a
stream lives inside its ``open`` call). Free slots are ``max_sessions`` minus the larger of the
replica's own count (its routing stats, ``Generator.record_routing_stats``, refreshed every
``ROUTING_STATS_PERIOD_S``) and the opens this router has in flight to it (exact at once).
Replicas that died leave the candidate list (Ray's health checks and restarts).
A call of a session this router did not open (another router's, e.g. after an ingress
restart) goes to the replica whose stats list it; when no replica's stats list it yet (they
lag a just-started stream by up to ``ROUTING_STATS_PERIOD_S``), the call waits for them, with
Ray's backoff, up to ``UNKNOWN_SESSION_WAIT_S``, and only then goes to any replica, which
answers ``no_session``. A call whose own replica left the list fails that way at once.

The stats the replicas report are also what ``/status`` shows (``replica_stats``).
"""

from __future__ import annotations

import time
import weakref

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTING_STATS_PERIOD_S = 0.25  # how often the controller polls each replica's stats
UNKNOWN_SESSION_WAIT_S = 2.0  # how long a call of a session no replica lists waits for the stats
_ROUTERS: weakref.WeakSet = weakref.WeakSet()  # this process's routers (for /status)


class SessionRouter(RequestRouter):
    """Open -> most free slots; any other call of a session -> the replica of its open."""

    def initialize_state(self, **kwargs) -> None:
        self.max_sessions = int(kwargs.get("max_sessions", 1))
        self.owner: dict[str, object] = {}  # session id -> replica id of its running open
        self.opens: dict[str, tuple[str, object]] = {}  # open's request id -> (session, rid)
        self.waiting: dict[str, float] = {}  # request id -> when it first found no replica
        # Ray ships this class by value: register with the imported module, not a copy
        from flashdreams.serve import ray_router

        ray_router._ROUTERS.add(self)

    def _used(self, replica: RunningReplica) -> int:
        mine = sum(rid == replica.replica_id for _, rid in self.opens.values())
        stats = replica.routing_stats or {}
        return max(mine, int(stats.get("active_sessions", 0)))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        meta = pending_request.metadata if pending_request is not None else None
        if meta is None or not meta.session_id:  # status, hello: any replica
            return [candidate_replicas]
        if meta.call_method != "open":
            return self._route_call(meta, candidate_replicas, pending_request)
        ranked = sorted(candidate_replicas, key=self._used)
        return [[r] for r in ranked]  # most free slots first; a full one answers busy

    def _route_call(self, meta, candidates: list[RunningReplica],
                    pending_request: PendingRequest) -> list[list[RunningReplica]]:  # fmt: skip
        """A ``message`` / ``close`` of a session: its open's replica, else the one whose stats
        list the session, else (briefly) nothing yet, else any (which answers ``no_session``)."""
        owner = self.owner.get(meta.session_id)
        chosen = [r for r in candidates if r.replica_id == owner]
        if not chosen:
            chosen = [r for r in candidates
                      if meta.session_id in (r.routing_stats or {}).get("sessions", ())]  # fmt: skip
        request = meta.internal_request_id
        if chosen:
            self.waiting.pop(request, None)
            return [chosen]
        now = time.monotonic()
        for stale in [k for k, t in self.waiting.items() if now - t > 30 * UNKNOWN_SESSION_WAIT_S]:
            del self.waiting[stale]  # requests cancelled while they waited
        first = self.waiting.setdefault(request, now)
        if owner is None and now - first < UNKNOWN_SESSION_WAIT_S:
            pending_request.routing_context.should_backoff = True  # Ray sleeps, then asks again
            return []
        self.waiting.pop(request, None)  # its replica is gone, or no replica has it: fail fast
        return [candidates]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        meta = pending_request.metadata
        if meta.call_method == "open" and meta.session_id:
            self.owner[meta.session_id] = replica_id
            self.opens[meta.internal_request_id] = (meta.session_id, replica_id)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        entry = self.opens.pop(internal_request_id, None)
        if entry is not None and self.owner.get(entry[0]) == entry[1]:
            del self.owner[entry[0]]


def replica_stats() -> list[dict]:
    """The latest stats of every running generator replica known to this process."""
    seen, out = set(), []
    for router in list(_ROUTERS):
        for replica in list(getattr(router, "_replicas", {}).values()):
            if replica.replica_id in seen:
                continue
            seen.add(replica.replica_id)
            stats = dict(replica.routing_stats or {"pid": None})  # None: no stats yet
            stats.setdefault("replica", replica.replica_id.unique_id)
            out.append(stats)
    return sorted(out, key=lambda s: s["replica"])
