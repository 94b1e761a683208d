"""Sessions over both protocols (issue 12): create/list/get/delete/step/checkpoint, session
keys, limits, the same numbers over REST and gRPC, and hostile input on both."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from conftest import API_KEY, ServerThread, running_server
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc

ADMIN = {"Authorization": f"Bearer {API_KEY}"}
PAIRS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Two plus two", "chosen": " is four.", "rejected": " is five."},
]
LORA = {"rank": 4, "alpha": 8.0, "seed": 7}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def meta(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    ckpt = tmp_path_factory.mktemp("ckpt")
    with running_server(checkpoint_dir=str(ckpt), max_sessions=4) as server:
        yield server


@pytest.fixture(scope="module")
def http(srv: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.http_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stubs(srv: ServerThread) -> Iterator[tuple[Any, Any]]:
    with grpc.insecure_channel(srv.grpc_target) as channel:
        yield pb_grpc.DpoServiceStub(channel), pb_grpc.SessionServiceStub(channel)


def _grpc_pairs() -> list[pb.PreferencePair]:
    return [pb.PreferencePair(text=pb.TextTriple(**p)) for p in PAIRS]


def _create_http(http: httpx.Client, **body: Any) -> tuple[str, str]:
    r = http.post("/v1/sessions", json={"lora": LORA, "optimizer": {"lr": 1e-2}, **body},
                  headers=ADMIN)  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()["session"]["id"], r.json()["key"]


def _create_grpc(sessions: Any) -> tuple[str, str]:
    config = pb.SessionConfig(
        lora=pb.SessionLora(rank=4, alpha=8.0, seed=7), optimizer=pb.SessionOptimizer(lr=1e-2)
    )
    out = sessions.CreateSession(pb.CreateSessionRequest(config=config), metadata=meta(API_KEY))
    return out.session.id, out.key


def _delete(http: httpx.Client, *ids: str) -> None:
    for sid in ids:
        assert http.delete(f"/v1/sessions/{sid}", headers=ADMIN).status_code == 204


def test_two_sessions_train_alike_on_both_protocols_and_move_nothing_else(
    srv: ServerThread, http: httpx.Client, stubs: tuple[Any, Any]
) -> None:
    dpo, sessions = stubs
    default_before = http.post("/dpo/loss", json={"pairs": PAIRS}).json()

    def run_http(sid: str, key: str) -> list[float]:
        out = []
        for i in range(3):
            r = http.post("/dpo/loss", headers=bearer(key), json={
                "pairs": PAIRS, "session": sid, "train": True, "request_id": f"{sid}-{i}"})  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json()["session"] == sid and r.json()["new_model_version"] == i + 1
            out.append(r.json()["loss"])
        return out

    def run_grpc(sid: str, key: str) -> list[float]:
        out = []
        for i in range(3):
            msg = dpo.ComputeLoss(
                pb.ComputeLossRequest(pairs=_grpc_pairs(), session=sid, train=True,
                                      request_id=f"{sid}-{i}"),
                metadata=meta(key),
            )  # fmt: skip
            assert msg.session == sid and msg.new_model_version == i + 1
            out.append(msg.loss)
        return out

    solo_id, solo_key = _create_http(http)
    alone = run_http(solo_id, solo_key)  # the same run, done alone
    a, key_a = _create_http(http)
    b, key_b = _create_grpc(sessions)
    with ThreadPoolExecutor(max_workers=2) as pool:  # two trainers at once, one per protocol
        fa, fb = pool.submit(run_http, a, key_a), pool.submit(run_grpc, b, key_b)
        losses_a, losses_b = fa.result(timeout=120), fb.result(timeout=120)
    assert losses_a == alone and losses_b == alone  # same seeds and data: identical runs
    assert alone[0] != alone[-1]  # and they trained
    assert srv.version == 0  # the default model did not move
    default_after = http.post("/dpo/loss", json={"pairs": PAIRS}).json()
    assert default_after["chosen_logps"] == default_before["chosen_logps"]
    info = http.get(f"/v1/sessions/{a}", headers=bearer(key_a)).json()
    got = sessions.GetSession(pb.GetSessionRequest(session=b), metadata=meta(key_b)).session
    assert info["model_version"] == got.model_version == 3
    assert info["trainable_parameters"] == got.trainable_parameters > 0
    n = info["trainable_parameters"]
    # float32 adapter + AdamW's two moments (+ a 4-byte step count per tensor)
    assert info["state_bytes"] == got.state_bytes
    assert 3 * 4 * n < info["state_bytes"] < 3 * 4 * n + 1024
    assert info["last_loss"] == pytest.approx(got.last_loss)
    listed = http.get("/v1/sessions", headers=ADMIN).json()
    assert {a, b} <= {s["id"] for s in listed["sessions"]}
    _delete(http, a, b, solo_id)


def test_session_keys_unknown_sessions_and_bad_input_on_both_protocols(
    http: httpx.Client, stubs: tuple[Any, Any]
) -> None:
    dpo, sessions = stubs
    a, key_a = _create_http(http)
    b, key_b = _create_http(http)
    body = {"pairs": PAIRS, "session": a, "train": True}
    assert http.post("/dpo/loss", json=body, headers=bearer(key_b)).status_code == 401
    assert http.post("/dpo/loss", json=body).status_code == 401
    assert http.get(f"/v1/sessions/{a}", headers=bearer(key_b)).status_code == 401
    assert http.post("/v1/sessions", json={}, headers=bearer(key_a)).status_code == 401
    assert http.get("/v1/sessions", headers=bearer(key_a)).status_code == 401
    with pytest.raises(grpc.RpcError) as err:
        dpo.ComputeLoss(pb.ComputeLossRequest(pairs=_grpc_pairs(), session=a, train=True),
                        metadata=meta(key_b))  # fmt: skip
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        sessions.Step(pb.StepRequest(session=a), metadata=meta(key_b))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    missing = "s-" + "0" * 16
    r = http.post("/dpo/loss", json={**body, "session": missing}, headers=bearer(key_a))
    assert r.status_code == 404
    with pytest.raises(grpc.RpcError) as err:
        sessions.GetSession(pb.GetSessionRequest(session=missing), metadata=meta(API_KEY))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # hostile: a malformed id, accumulate without a session or without train, bad configs
    assert http.post("/dpo/loss", json={**body, "session": "../etc"}).status_code == 422
    assert http.get("/v1/sessions/s-XYZ", headers=ADMIN).status_code == 422
    with pytest.raises(grpc.RpcError) as err:
        dpo.ComputeLoss(pb.ComputeLossRequest(pairs=_grpc_pairs(), session="../etc"),
                        metadata=meta(key_a))  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        sessions.GetSession(pb.GetSessionRequest(session="s-XYZ"), metadata=meta(API_KEY))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    r = http.post("/dpo/loss", json={"pairs": PAIRS, "train": True, "accumulate": True},
                  headers=ADMIN)  # fmt: skip
    assert r.status_code == 422 and "session" in r.text
    r = http.post("/dpo/loss", json={"pairs": PAIRS, "session": a, "accumulate": True},
                  headers=bearer(key_a))  # fmt: skip
    assert r.status_code == 422 and "train" in r.text
    with pytest.raises(grpc.RpcError) as err:
        dpo.ComputeLoss(pb.ComputeLossRequest(pairs=_grpc_pairs(), session=a, accumulate=True),
                        metadata=meta(key_a))  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for bad in ({"lora": {"rank": 0}}, {"lora": {"target_modules": ["lm_head"]}},
                {"optimizer": {"lr": -1}}, {"reference": "mine"}, {"extra": 1}):  # fmt: skip
        r = http.post("/v1/sessions", json=bad, headers=ADMIN)
        assert r.status_code == 422, (bad, r.text)
    with pytest.raises(grpc.RpcError) as err:
        sessions.CreateSession(
            pb.CreateSessionRequest(config=pb.SessionConfig(lora=pb.SessionLora(rank=0))),
            metadata=meta(API_KEY),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        sessions.CreateSession(
            pb.CreateSessionRequest(
                config=pb.SessionConfig(lora=pb.SessionLora(target_modules=["embed_tokens"]))
            ),
            metadata=meta(API_KEY),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    r = http.post(f"/v1/sessions/{a}/step", json={}, headers=bearer(key_a))
    assert r.status_code == 409  # nothing accumulated
    with pytest.raises(grpc.RpcError) as err:
        sessions.Step(pb.StepRequest(session=a), metadata=meta(key_a))
    assert err.value.code() == grpc.StatusCode.ABORTED
    none_id, none_key = _create_http(http, reference="none")
    r = http.post("/dpo/loss", json={"pairs": PAIRS, "session": none_id}, headers=bearer(none_key))
    assert r.status_code == 200 and r.json()["reference_chosen_logps"] is None
    r = http.post("/dpo/loss", headers=bearer(none_key),
                  json={"pairs": PAIRS, "session": none_id, "reference": "frozen"})  # fmt: skip
    assert r.status_code == 200 and r.json()["reference_chosen_logps"] == r.json()["chosen_logps"]
    client_id, client_key = _create_http(http, reference="client")
    r = http.post("/dpo/loss", headers=bearer(client_key),
                  json={"pairs": PAIRS, "session": client_id})  # fmt: skip
    assert r.status_code == 422 and "reference_chosen_logp" in r.text
    _delete(http, none_id, client_id)
    for sid in (a, b):  # none of that moved a session
        assert http.get(f"/v1/sessions/{sid}", headers=ADMIN).json()["model_version"] == 0
    _delete(http, a, b)


def test_session_rpcs_refuse_bytes_that_do_not_parse(srv: ServerThread) -> None:
    with grpc.insecure_channel(srv.grpc_target) as channel:
        for rpc in ("GetSession", "CreateSession", "Step"):
            call = channel.unary_unary(f"/dpo.v1.SessionService/{rpc}")
            with pytest.raises(grpc.RpcError) as err:
                call(b"\xff\xff\xff", metadata=meta(API_KEY), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc


def test_limit_accumulate_step_and_checkpoint(
    srv: ServerThread, http: httpx.Client, stubs: tuple[Any, Any]
) -> None:
    dpo, sessions = stubs
    made = [_create_http(http) for _ in range(4)]
    r = http.post("/v1/sessions", json={}, headers=ADMIN)
    assert r.status_code == 429 and "DPO_MAX_SESSIONS" in r.json()["detail"]
    with pytest.raises(grpc.RpcError) as err:
        sessions.CreateSession(pb.CreateSessionRequest(), metadata=meta(API_KEY))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (a, key_a), (b, key_b) = made[0], made[1]
    r = http.post("/dpo/loss", headers=bearer(key_a), json={
        "pairs": PAIRS[:1], "session": a, "train": True, "accumulate": True, "request_id": "x1"})  # fmt: skip
    assert r.status_code == 200 and r.json()["accumulated_pairs"] == 1
    assert r.json()["trained"] is False and r.json()["model_version"] == 0
    out = dpo.ComputeLoss(
        pb.ComputeLossRequest(
            pairs=_grpc_pairs()[1:], session=a, train=True, accumulate=True, request_id="x2"
        ),
        metadata=meta(key_a),
    )
    assert out.accumulated_pairs == 2
    step = sessions.Step(pb.StepRequest(session=a, request_id="st-1"), metadata=meta(key_a))
    assert step.new_model_version == 1 and step.pairs == 2 and step.requests == 2
    again = http.post(f"/v1/sessions/{a}/step", json={"request_id": "st-1"}, headers=bearer(key_a))
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["new_model_version"] == 1
    ck = http.post(f"/v1/sessions/{a}/checkpoint", headers=bearer(key_a))
    assert ck.status_code == 200 and ck.json()["model_version"] == 1
    assert Path(ck.json()["path"]).is_file()
    out = sessions.CheckpointSession(pb.CheckpointSessionRequest(session=b), metadata=meta(key_b))
    assert out.model_version == 0 and Path(out.path).is_file()
    _delete(http, *(sid for sid, _ in made))
    assert not Path(ck.json()["path"]).exists()  # deleting a session removes its checkpoint


def test_session_keys_work_when_loss_calls_need_a_key(tmp_path: Path) -> None:
    with (
        running_server(require_key_for_loss=True) as server,
        httpx.Client(base_url=server.http_url, timeout=60) as http,
        grpc.insecure_channel(server.grpc_target) as channel,
    ):
        sid, key = _create_http(http)
        body = {"pairs": PAIRS, "session": sid}
        assert http.post("/dpo/loss", json=body, headers=bearer(key)).status_code == 200
        assert http.post("/dpo/loss", json={"pairs": PAIRS}, headers=bearer(key)).status_code == 401
        dpo = pb_grpc.DpoServiceStub(channel)
        out = dpo.ComputeLoss(pb.ComputeLossRequest(pairs=_grpc_pairs(), session=sid),
                              metadata=meta(key))  # fmt: skip
        assert out.session == sid
        with pytest.raises(grpc.RpcError) as err:  # the session key is not the admin key
            dpo.ComputeLoss(pb.ComputeLossRequest(pairs=_grpc_pairs()), metadata=meta(key))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_slow_session_checkpoint_blocks_no_other_session(
    srv: ServerThread, http: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, key_a = _create_http(http)
    b, key_b = _create_http(http)
    store = srv.core.engine.sessions.store
    entered, release = threading.Event(), threading.Event()
    real_save = store.save

    def slow_save(sid: str, *args: Any) -> Any:  # a disk that hangs on A's file (a fault)
        if sid == a:
            entered.set()
            assert release.wait(30)
        return real_save(sid, *args)

    monkeypatch.setattr(store, "save", slow_save)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(http.post, f"/v1/sessions/{a}/checkpoint", headers=bearer(key_a))
        assert entered.wait(30)
        try:  # while A's checkpoint is being written, B trains
            r = http.post("/dpo/loss", headers=bearer(key_b), timeout=20,
                          json={"pairs": PAIRS, "session": b, "train": True})  # fmt: skip
            assert r.status_code == 200 and r.json()["new_model_version"] == 1
            assert not pending.done()
        finally:
            release.set()
        assert pending.result(timeout=30).status_code == 200
    _delete(http, a, b)
