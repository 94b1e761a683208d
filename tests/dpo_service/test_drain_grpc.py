"""Draining seen from gRPC: health goes NOT_SERVING, new calls get UNAVAILABLE, the call in
flight completes; and every privileged RPC needs the key."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import API_KEY, ServerThread, small_settings
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc

AUTH = (("authorization", f"Bearer {API_KEY}"),)


def _request(train: bool) -> pb.ComputeLossRequest:
    pair = pb.PreferencePair(text=pb.TextTriple(prompt="Hi", chosen=" hello", rejected=" no"))
    return pb.ComputeLossRequest(pairs=[pair], train=train, request_id=f"drain-{train}")


def _wait_until(predicate: object, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_grpc_sees_the_drain() -> None:
    srv = ServerThread(small_settings(enable_http=False, drain_timeout_s=30))
    release = threading.Event()
    try:
        start = srv.version
        with grpc.insecure_channel(srv.grpc_target) as channel, ThreadPoolExecutor(2) as pool:
            stub = pb_grpc.DpoServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert health.Check(health_pb2.HealthCheckRequest()).status == serving
            srv.core.engine._executor.submit(release.wait, 60)  # hold the model worker
            in_flight = pool.submit(stub.ComputeLoss, _request(True), metadata=AUTH, timeout=60)
            _wait_until(lambda: srv.core.engine.pending() == 1)
            shutdown = asyncio.run_coroutine_threadsafe(srv.running.shutdown(), srv.loop)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            _wait_until(lambda: health.Check(health_pb2.HealthCheckRequest()).status == not_serving)
            try:
                stub.ComputeLoss(_request(False), timeout=10)
                raise AssertionError("a new call was accepted while draining")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            release.set()
            response = in_flight.result(timeout=60)
            assert response.trained and response.new_model_version == start + 1
            shutdown.result(timeout=60)
    finally:
        release.set()
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv.thread.join(timeout=10)


def test_privileged_rpcs_need_the_key(server: ServerThread) -> None:
    before = server.version
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.DpoServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", API_KEY),)):
            for call, request in (
                (stub.ComputeLoss, _request(True)),
                (stub.Checkpoint, pb.CheckpointRequest()),
            ):
                try:
                    call(request, metadata=metadata, timeout=30)
                    raise AssertionError(f"{call} accepted without a valid key")
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        # loss-only needs no key by default
        assert stub.ComputeLoss(_request(False), timeout=30).trained is False
    assert server.version == before
