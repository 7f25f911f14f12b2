"""The edge's side of balanced placement behind Envoy (edge_agent/sticky.py): it asks
for balance, follows the replica a successful answer names, sends that name back on
every later call, and ignores a name it could not send or an error's name."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from edge_agent.security import open_channel
from edge_agent.sticky import MAX_UPSTREAM_CHARS, StickyUpstream, valid_upstream
from splitkd.grpc_options import BALANCED, PLACEMENT_HEADER, UPSTREAM_HEADER
from tests.support import RPC_TIMEOUT

METHOD = "/splitkd.v1.SplitTraining/Probe"
REPLICA_A = base64.b64encode(b"10.0.0.1:50051").decode()
REPLICA_B = base64.b64encode(b"10.0.0.2:50051").decode()


def test_a_name_is_kept_only_when_it_can_be_sent_back() -> None:
    assert valid_upstream(REPLICA_A) == REPLICA_A
    assert valid_upstream("x" * MAX_UPSTREAM_CHARS) is not None
    for bad in ("", "x" * (MAX_UPSTREAM_CHARS + 1), "a b", "a\nb", "a\x7fb", "é", b"abc", None):
        assert valid_upstream(bad) is None, bad


def test_observe_follows_a_valid_name_and_ignores_the_rest() -> None:
    sticky = StickyUpstream()
    assert sticky.metadata() == ((PLACEMENT_HEADER, BALANCED),)
    sticky.observe([("other", "x"), (UPSTREAM_HEADER, REPLICA_A)])
    assert sticky.metadata() == ((PLACEMENT_HEADER, BALANCED), (UPSTREAM_HEADER, REPLICA_A))
    for bad in ("z" * 1000, "two words", "tab\there"):
        sticky.observe([(UPSTREAM_HEADER, bad)])
    sticky.observe(None)
    sticky.observe([])  # no name: the call went where it was sent
    assert sticky.upstream == REPLICA_A


class Answers(grpc.GenericRpcHandler):
    """A stand-in for Envoy and its replicas: answers name the replica the test says."""

    def __init__(self) -> None:
        self.name = ""  # the x-splitkd-upstream of the next answer ("": none)
        self.fail = False
        self.seen: list[dict[str, str]] = []

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        if details.method != METHOD:
            return None
        return grpc.unary_unary_rpc_method_handler(self._answer)

    def _answer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen.append(dict(context.invocation_metadata()))
        if self.name:
            context.send_initial_metadata(((UPSTREAM_HEADER, self.name),))
        if self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "served by another replica")
        return b"ok"


@pytest.fixture
def answers() -> Iterator[tuple[Answers, str]]:
    handler = Answers()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield handler, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_the_channel_sends_back_the_replica_of_the_last_successful_answer(
    answers: tuple[Answers, str],
) -> None:
    handler, address = answers
    sticky = StickyUpstream()
    channel = open_channel(address, [], None, (("x-splitkd-route", "dev-1"),), (sticky,))
    call = channel.unary_unary(METHOD)
    try:
        handler.name = REPLICA_A
        assert call(b"", timeout=RPC_TIMEOUT) == b"ok"  # the first call: no replica yet
        handler.name = ""
        call(b"", timeout=RPC_TIMEOUT)
        handler.name, handler.fail = REPLICA_B, True  # an error names no home
        with pytest.raises(grpc.RpcError):
            call(b"", timeout=RPC_TIMEOUT)
        handler.name, handler.fail = "has a space", False  # malformed: ignored
        call(b"", timeout=RPC_TIMEOUT)
        handler.name = REPLICA_B  # moved (its replica died): follow
        call.future(b"", timeout=RPC_TIMEOUT).result()
        call(b"", timeout=RPC_TIMEOUT)
    finally:
        channel.close()
    upstreams = [seen.get(UPSTREAM_HEADER) for seen in handler.seen]
    assert upstreams == [None, REPLICA_A, REPLICA_A, REPLICA_A, REPLICA_A, REPLICA_B]
    assert all(seen[PLACEMENT_HEADER] == BALANCED for seen in handler.seen)
    assert all(seen["x-splitkd-route"] == "dev-1" for seen in handler.seen)
