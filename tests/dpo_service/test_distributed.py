"""Issue 13: one logical service over a torchrun world (gloo on CPU, world size 2, the
built-in model), against the same requests at world size 1.

Tolerances. A pair's log-probs do not depend on which rank computes it beyond float32 rounding
(each rank runs its share of a micro-batch as a smaller padded batch; measured differences are
0 to 2e-7 relative). Gradients are the same per-pair terms summed in another order (DDP and
FSDP2 average the ranks' partial sums), so they agree to float32 rounding, about 1e-7
relative. AdamW divides by the root of the second moment, which can amplify a rounding-level
difference of a near-zero gradient element up to the size of one update (lr): after ``k``
steps a weight may differ by up to ``k * lr`` in the worst case. The tests allow
``REL = 1e-5`` on losses and log-probs and ``k * lr / 10`` on weights: ten times more than the
rounding they measure, still far from one real step.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from safetensors.torch import load_file

from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from server_process import AUTH
from torchrun_world import PAIRS, WORLD_ENV, TorchrunWorld, loss, start_world, wait_gone

pytestmark = pytest.mark.slow

LR = 1e-3  # ServerProcess's DPO_LR
SESSION_LR = 1e-2
STEPS = 3
REL = 1e-5
LORA = {"rank": 4, "alpha": 8.0, "seed": 7}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(1.0, abs(a), abs(b))


def _scenario(world: TorchrunWorld) -> dict[str, Any]:
    """The request sequence both world sizes get; what they answer and hold afterwards."""
    out: dict[str, Any] = {"answers": []}
    answers = out["answers"]
    with world.client() as c:
        answers.append(loss(c, PAIRS, beta=0.1, reference="frozen"))
        for k in range(STEPS):
            answers.append(
                loss(c, PAIRS, beta=0.1, train=True, request_id=f"step-{k}", reference="frozen")
            )
        answers.append(loss(c, PAIRS[:3], beta=0.1, return_token_logps=True))
        created = c.post(
            "/v1/sessions", json={"lora": LORA, "optimizer": {"lr": SESSION_LR}}, headers=AUTH
        )
        assert created.status_code == 201, created.text
        sid, key = created.json()["session"]["id"], created.json()["key"]
        session = {"session": sid, "beta": 0.1, "headers": bearer(key)}
        answers.append(loss(c, PAIRS, train=True, request_id="s-0", **session))
        for k in range(2):
            answers.append(loss(c, PAIRS[k::2], train=True, accumulate=True, **session))
        stepped = c.post(
            f"/v1/sessions/{sid}/step", json={"request_id": "s-step"}, headers=bearer(key)
        )
        assert stepped.status_code == 200, stepped.text
        out["session_step"] = stepped.json()
        answers.append(loss(c, PAIRS, **session))
        out["model"] = c.get("/v1/model", headers=AUTH).json()
        saved = c.post("/admin/checkpoint", headers=AUTH)
        assert saved.status_code == 200, saved.text
        out["checkpoint"] = Path(saved.json()["path"])
        out["session_file"] = world_ckpt(world) / "sessions" / f"{sid}.safetensors"
        with grpc.insecure_channel(world.grpc_target) as channel:
            stub = pb_grpc.DpoServiceStub(channel)
            reply = stub.ComputeLoss(
                pb.ComputeLossRequest(
                    pairs=[pb.PreferencePair(text=pb.TextTriple(**p)) for p in PAIRS], beta=0.1
                ),
                metadata=(("authorization", AUTH["Authorization"]),),
                timeout=60,
            )
        out["grpc_loss"] = reply.loss
        out["http_loss"] = loss(c, PAIRS, beta=0.1)["loss"]
    return out


def world_ckpt(world: TorchrunWorld) -> Path:
    return world.checkpoint_dir


def _stop_cleanly(world: TorchrunWorld) -> None:
    """SIGTERM to rank 0 drains and shuts every rank down: torchrun exits 0."""
    pids = world.rank_pids()
    os.kill(pids[0], signal.SIGTERM)
    assert wait_gone(world, 60) == 0, world.log()


def _run(tmp: Path, nproc: int, parallel: str, name: str) -> dict[str, Any]:
    ckpt = tmp / f"ckpt-{name}"
    world = TorchrunWorld(
        tmp / f"{name}.log", nproc, parallel=parallel, checkpoint_dir=str(ckpt), **WORLD_ENV
    )
    world.checkpoint_dir = ckpt
    try:
        world.wait_ready(180)
        out = _scenario(world)
        _stop_cleanly(world)
        return out
    finally:
        world.close()


@pytest.fixture(scope="module")
def world_one(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("w1"), 1, "ddp", "world1")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_world_of_two_matches_world_of_one(
    parallel: str, world_one: dict[str, Any], tmp_path: Path
) -> None:
    """Loss-only (with the frozen reference), 3 train steps, per-token log-probs, and a LoRA
    session (a step, two accumulations and their step): the same losses, log-probs and
    versions at world size 2 as at 1; the policy's weights (the checkpoint rank 0 gathered
    and wrote) and the session's adapter match within the module's tolerance."""
    two = _run(tmp_path, 2, parallel, f"world2-{parallel}")
    assert len(two["answers"]) == len(world_one["answers"])
    for a, b in zip(world_one["answers"], two["answers"], strict=True):
        assert a.get("model_version") == b.get("model_version")
        assert a.get("new_model_version") == b.get("new_model_version")
        assert _close(a["loss"], b["loss"]), (a["loss"], b["loss"])
        for field in ("chosen_logps", "rejected_logps", "reference_chosen_logps"):
            for x, y in zip(a.get(field) or [], b.get(field) or [], strict=True):
                assert _close(x, y), (field, x, y)
    one, two_tokens = world_one["answers"][4], two["answers"][4]
    assert one["chosen_token_ids"] == two_tokens["chosen_token_ids"]
    for name in ("chosen_token_logps", "rejected_token_logps"):
        for t1, t2 in zip(one[name], two_tokens[name], strict=True):
            assert len(t1) == len(t2) and all(_close(x, y) for x, y in zip(t1, t2, strict=True))
    assert (
        world_one["session_step"]["new_model_version"]
        == two["session_step"]["new_model_version"]
        == 2
    )
    assert _close(world_one["session_step"]["loss"], two["session_step"]["loss"])
    assert two["model"]["model_version"] == STEPS
    assert two["grpc_loss"] == pytest.approx(two["http_loss"], abs=0, rel=0)  # same numbers
    w1 = load_file(world_one["checkpoint"] / "model.safetensors")
    w2 = load_file(two["checkpoint"] / "model.safetensors")
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert worst <= STEPS * LR / 10, worst
    trained = [a["loss"] for a in two["answers"][1 : 1 + STEPS]]
    assert len(set(trained)) == STEPS  # the weights moved at every step
    a1, a2 = _adapter(world_one["session_file"]), _adapter(two["session_file"])
    assert a1 and a1.keys() == a2.keys()
    session_worst = max(float((a1[k] - a2[k]).abs().max()) for k in a1)
    assert session_worst <= 2 * SESSION_LR / 10, session_worst  # its two steps at lr 1e-2


def _adapter(path: Path) -> dict[str, Any]:
    """A session file's adapter tensors, named without the session id."""
    return {
        re.sub(r"s-[0-9a-f]{16}", "S", k): v
        for k, v in load_file(path).items()
        if k.startswith("adapter.")
    }


def _train_and_probe(world: TorchrunWorld, tag: str, key: str | None, sid: str | None) -> dict[str, Any]:  # fmt: skip
    """One default-model step and one session step, then loss-only answers of both."""
    with world.client() as c:
        stepped = loss(c, PAIRS, beta=0.1, train=True, request_id=f"{tag}-step")
        out = {"version": stepped["new_model_version"], "probe": loss(c, PAIRS, beta=0.1)}
        if sid is not None and key is not None:
            auth = bearer(key)
            loss(c, PAIRS, beta=0.1, train=True, session=sid, headers=auth, request_id=f"{tag}-s")
            out["session_probe"] = loss(c, PAIRS, beta=0.1, session=sid, headers=auth)
    return out


def _resumed(world: TorchrunWorld, key: str, sid: str) -> dict[str, Any]:
    with world.client() as c:
        model = c.get("/v1/model", headers=AUTH).json()
        return {
            "version": model["model_version"],
            "probe": loss(c, PAIRS, beta=0.1),
            "session_probe": loss(c, PAIRS, beta=0.1, session=sid, headers=bearer(key)),
            "replay": loss(c, PAIRS, beta=0.1, train=True, request_id="w2-step"),
        }


def test_a_checkpoint_crosses_world_sizes_both_ways(tmp_path: Path) -> None:
    """World 2 (FSDP2) trains and checkpoints; world 1 resumes it (same version, same answers,
    the session and the idempotency record too) and trains on; then world 2 (FSDP2) and world
    1 each resume that checkpoint (with its AdamW moments) and take the same next step: the
    same answers, so the moments crossed too (a fresh AdamW's first step would differ)."""
    ckpt = tmp_path / "ckpt"
    two = start_world(tmp_path, 2, "fsdp", ckpt, "two-fsdp")
    try:
        with two.client() as c:
            created = c.post("/v1/sessions", json={"lora": LORA}, headers=AUTH)
            assert created.status_code == 201, created.text
            sid, key = created.json()["session"]["id"], created.json()["key"]
        before = _train_and_probe(two, "w2", key, sid)
        _stop_cleanly(two)
    finally:
        two.close()
    one = start_world(tmp_path, 1, "ddp", ckpt, "one")
    try:
        after = _resumed(one, key, sid)
        assert after["version"] == before["version"] == 1
        assert _close(after["probe"]["loss"], before["probe"]["loss"])
        assert _close(after["session_probe"]["loss"], before["session_probe"]["loss"])
        assert after["replay"]["new_model_version"] == 1  # the record crossed too: no new step
        before = _train_and_probe(one, "w1", None, None)
        _stop_cleanly(one)
    finally:
        one.close()
    copy = tmp_path / "ckpt-copy"
    shutil.copytree(ckpt, copy, ignore=shutil.ignore_patterns("*.lock", "LOCK*"))
    nexts = []
    for nproc, where, name in ((2, ckpt, "two-again"), (1, copy, "one-again")):
        world = start_world(tmp_path, nproc, "fsdp", where, name)
        try:
            with world.client() as c:
                model = c.get("/v1/model", headers=AUTH).json()
                assert model["model_version"] == before["version"] == 2
                assert _close(loss(c, PAIRS, beta=0.1)["loss"], before["probe"]["loss"])
                nexts.append(_train_and_probe(world, "next", None, None))
            _stop_cleanly(world)
        finally:
            world.close()
    assert nexts[0]["version"] == nexts[1]["version"] == 3
    assert _close(nexts[0]["probe"]["loss"], nexts[1]["probe"]["loss"])


def _own_base_run(tmp: Path, nproc: int) -> list[float]:
    """Sessions on a base of their own (no frozen reference copy kept): rank 0 builds it and
    every rank takes its weights; a step against that base's adapter-off reference."""
    world = start_world(
        tmp, nproc, "ddp", tmp / f"ckpt-{nproc}", f"own-base-{nproc}", keep_reference="false"
    )
    try:
        with world.client() as c:
            created = c.post("/v1/sessions", json={"lora": LORA}, headers=AUTH)
            assert created.status_code == 201, created.text
            sid, key = created.json()["session"]["id"], created.json()["key"]
            auth = {"session": sid, "headers": bearer(key), "beta": 0.1, "reference": "frozen"}
            out = [loss(c, PAIRS, train=True, **auth)["loss"], loss(c, PAIRS, **auth)["loss"]]
            assert c.delete(f"/v1/sessions/{sid}", headers=AUTH).status_code == 204
            again = c.post("/v1/sessions", json={"lora": LORA}, headers=AUTH)  # after a delete
            assert again.status_code == 201, again.text
            sid, key = again.json()["session"]["id"], again.json()["key"]
            out.append(loss(c, PAIRS, session=sid, headers=bearer(key), beta=0.1)["loss"])
        _stop_cleanly(world)
        return out
    finally:
        world.close()


def test_sessions_on_their_own_base_match_world_one(tmp_path: Path) -> None:
    one, two = _own_base_run(tmp_path, 1), _own_base_run(tmp_path, 2)
    assert all(_close(a, b) for a, b in zip(one, two, strict=True)), (one, two)
    assert one[1] != one[0]  # the step moved the adapter


def test_an_hf_model_trains_the_same_under_fsdp(tmp_path: Path) -> None:
    """An ``hf:`` model (a tiny Llama built in the test): FSDP2 finds its decoder layers and
    two steps give world size 1's losses."""
    from test_hf_model import TEXT_PAIRS, _save_tiny_llama

    model = tmp_path / "tiny-llama"
    model.mkdir()
    _save_tiny_llama(model)
    runs = []
    for nproc in (1, 2):
        world = start_world(
            tmp_path, nproc, "fsdp", tmp_path / f"ckpt-{nproc}", f"hf-{nproc}", model=f"hf:{model}"
        )
        try:
            with world.client() as c:
                out = [loss(c, TEXT_PAIRS, beta=0.1, train=True)["loss"] for _ in range(2)]
                out.append(loss(c, TEXT_PAIRS, beta=0.1)["loss"])
            _stop_cleanly(world)
        finally:
            world.close()
        runs.append(out)
    assert all(_close(a, b) for a, b in zip(*runs, strict=True)), runs
    assert runs[0][0] != runs[0][2]  # the steps moved the model
