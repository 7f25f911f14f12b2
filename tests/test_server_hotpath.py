"""The per-call path of the cloud's gRPC server: what runs once per method, not per call."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import grpc

from cloud_service.server import MemoizedInterceptors


class Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class Tagging(grpc.ServerInterceptor):
    """Wraps the behaviour so that a call logs ``name`` before going on; counts wrappings."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.wrapped = 0

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        self.wrapped += 1
        inner = handler.unary_unary

        def call(request: Any, context: Any) -> Any:
            self.log.append(self.name)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(call)


def _handler(log: list[str]) -> grpc.RpcMethodHandler:
    def behaviour(request: Any, context: Any) -> Any:
        log.append("servicer")
        return request

    return grpc.unary_unary_rpc_method_handler(behaviour)


def test_interceptors_wrap_a_method_once_and_still_run_on_every_call() -> None:
    log: list[str] = []
    first, second = Tagging("first", log), Tagging("second", log)
    chain = MemoizedInterceptors([first, second])
    step = _handler(log)
    answers = [chain.intercept_service(lambda d: step, Details("/x/Step")) for _ in range(5)]
    # Built once: every later call of the method reuses the wrapped handler.
    assert first.wrapped == second.wrapped == 1
    assert all(a is answers[0] for a in answers)
    for _ in range(2):
        assert answers[0] is not None and answers[0].unary_unary is not None
        assert answers[0].unary_unary("request", None) == "request"
    # The list's order is the calls' order, as with grpc.server(interceptors=[...]).
    assert log == ["first", "second", "servicer"] * 2


def test_another_method_or_a_new_handler_is_wrapped_anew() -> None:
    log: list[str] = []
    tagging = Tagging("auth", log)
    chain = MemoizedInterceptors([tagging])
    step, finish = _handler(log), _handler(log)
    chain.intercept_service(lambda d: step, Details("/x/Step"))
    chain.intercept_service(lambda d: finish, Details("/x/Finish"))
    assert tagging.wrapped == 2
    replaced = _handler(log)  # e.g. a servicer registered again under the same name
    answer = chain.intercept_service(lambda d: replaced, Details("/x/Step"))
    assert tagging.wrapped == 3
    assert answer is not None and answer.unary_unary is not None
    answer.unary_unary("r", None)
    assert log == ["auth", "servicer"]
    # An unknown method stays unknown (gRPC answers UNIMPLEMENTED), nothing cached.
    assert chain.intercept_service(lambda d: None, Details("/x/Nope")) is None


def test_grpc_workers_out_of_range_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cloud_service.cli", "serve", "--grpc-workers", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "splitkd-cloud: error: --grpc-workers must be in 1..256, got 0"
    ]
