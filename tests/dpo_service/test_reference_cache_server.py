"""The reference log-prob cache through a real server on loopback (issue 14, item 4): cached
numbers equal a recomputation, a cache of other weights is never used, a corrupt file is set
aside, concurrent requests, ``precompute-reference`` then an epoch of only hits, metrics."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from conftest import API_KEY, SMALL_MODEL, ServerThread, running_server
from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.api.grpc.gen import dpo_service_pb2_grpc as pb_grpc
from dpo_service.cli import main

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GRPC_AUTH = (("authorization", f"Bearer {API_KEY}"),)
# Reference sums of one pair computed in different batches differ by float32 rounding in the
# padded forward (measured: <= 8e-6 on sums of ~70 nats, i.e. ~1e-7 relative, a few ulps);
# 1e-5 relative is well above that and far below any real difference between two models.
BATCH_RTOL = 1e-5


def pairs_of(n: int, tag: str = "") -> list[dict[str, Any]]:
    """``n`` distinct text pairs of varied lengths, plus one given as token ids."""
    out: list[dict[str, Any]] = [
        {"prompt": f"{tag}Q{i}: " + "why " * (i % 4), "chosen": f" yes {i}" * (1 + i % 3),
         "rejected": f" no{i}" * (2 + i % 2)}
        for i in range(n - 1)
    ]  # fmt: skip
    out.append({"prompt_ids": [256, 72, 105 + len(tag)], "chosen_ids": [33, 257],
                "rejected_ids": [63, 257]})  # fmt: skip
    return out


def loss(srv: ServerThread, pairs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    with httpx.Client(base_url=srv.http_url, headers=AUTH, timeout=60) as c:
        r = c.post("/dpo/loss", json={"pairs": pairs, "reference": "frozen", **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def refs(body: dict[str, Any]) -> list[float]:
    return [*body["reference_chosen_logps"], *body["reference_rejected_logps"]]


def metric(srv: ServerThread, name: str) -> float:
    with httpx.Client(base_url=srv.http_url, headers=AUTH) as c:
        text = c.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def hits_misses(srv: ServerThread) -> tuple[float, float]:
    return (
        metric(srv, "dpo_reference_cache_hits_total"),
        metric(srv, "dpo_reference_cache_misses_total"),
    )


@pytest.fixture(scope="module")
def plain() -> Iterator[ServerThread]:
    """The same model (seed 0) with a frozen reference and no cache: the recomputation."""
    with running_server(keep_reference=True, reference_cache="off") as srv:
        yield srv


def cached(path: Path, **kw: Any) -> Any:
    return running_server(keep_reference=True, reference_cache=str(path), **kw)


def grpc_refs(srv: ServerThread, pairs: list[dict[str, Any]]) -> list[float]:
    wire = []
    for p in pairs:
        if "prompt" in p:
            wire.append(pb.PreferencePair(text=pb.TextTriple(**p)))
        else:
            wire.append(pb.PreferencePair(tokens=pb.TokenTriple(**p)))
    with grpc.insecure_channel(srv.grpc_target) as ch:
        res = pb_grpc.DpoServiceStub(ch).ComputeLoss(
            pb.ComputeLossRequest(pairs=wire, reference=pb.REFERENCE_MODE_FROZEN),
            metadata=GRPC_AUTH,
            timeout=60,
        )
    return [*res.reference_chosen_logps, *res.reference_rejected_logps]


def test_cached_values_equal_a_recomputation_bit_for_bit(
    plain: ServerThread, tmp_path: Path
) -> None:
    """Cold (all misses) and warm (all hits) answers are the uncached server's, exactly, on
    both protocols; every sequence is looked up once per request."""
    pairs = pairs_of(6)
    expected = loss(plain, pairs)
    with cached(tmp_path / "c.sqlite") as srv:
        cold = loss(srv, pairs)
        assert hits_misses(srv) == (0, 12)
        warm = loss(srv, pairs)
        assert hits_misses(srv) == (12, 12)
        assert refs(cold) == refs(warm) == refs(expected)
        assert cold["loss"] == warm["loss"] == expected["loss"]
        assert grpc_refs(srv, pairs) == refs(expected)  # float32 values, sent as doubles
        assert hits_misses(srv) == (24, 12)
        assert metric(srv, "dpo_reference_cache_entries") == 12
        assert metric(srv, "dpo_reference_cache_bytes") > 0


def test_a_partly_cached_batch_returns_the_stored_bits(plain: ServerThread, tmp_path: Path) -> None:
    """Hits come back exactly as stored; the misses (computed in a smaller sub-batch) match a
    full-batch recomputation up to float32 rounding (see BATCH_RTOL)."""
    a, b, c = pairs_of(4, "a")[:1], pairs_of(4, "b")[:2], pairs_of(4, "c")[:3]
    with cached(tmp_path / "c.sqlite") as srv:
        first = loss(srv, a + b)
        mixed = loss(srv, a + c)
        assert hits_misses(srv) == (2, 6 + 6)
    expected = loss(plain, a + c)
    for side in ("reference_chosen_logps", "reference_rejected_logps"):
        assert mixed[side][0] == first[side][0]  # the hit: bit for bit
        assert mixed[side][1:] == pytest.approx(expected[side][1:], rel=BATCH_RTOL, abs=0)


def test_a_cache_built_for_other_weights_is_never_used(plain: ServerThread, tmp_path: Path) -> None:
    """A cache filled by seed 1 (same tokenizer, same pairs) gives seed 0 no hit; seed 0's
    numbers equal the recomputation. Both identities' rows then live side by side."""
    path, pairs = tmp_path / "c.sqlite", pairs_of(5)
    with cached(path, seed=1) as other:
        other_refs = refs(loss(other, pairs))
    with cached(path) as srv:
        mine = refs(loss(srv, pairs))
        assert hits_misses(srv) == (0, 10)
        assert metric(srv, "dpo_reference_cache_entries") == 20
    assert mine == refs(loss(plain, pairs)) and mine != other_refs


@pytest.mark.slow
def test_another_compute_dtype_gets_no_hits(tmp_path: Path) -> None:
    """bfloat16 compute gives other numbers: a float32 cache is not used by it."""
    path, pairs = tmp_path / "c.sqlite", pairs_of(3)
    with cached(path) as srv:
        loss(srv, pairs)
    with cached(path, dtype="bfloat16") as srv:
        loss(srv, pairs)
        assert hits_misses(srv) == (0, 6)


def test_a_corrupt_cache_file_is_set_aside_and_the_service_works(
    plain: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, pairs = tmp_path / "c.sqlite", pairs_of(4)
    path.write_bytes(os.urandom(10_000))
    with caplog.at_level(logging.WARNING), cached(path) as srv:
        assert refs(loss(srv, pairs)) == refs(loss(plain, pairs))
        assert grpc_refs(srv, pairs) == refs(loss(plain, pairs))  # a hit now, over gRPC
        assert hits_misses(srv) == (8, 8)
        assert metric(srv, 'dpo_reference_cache_errors_total{kind="corrupt"}') == 1
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert [p for p in tmp_path.iterdir() if ".bad-" in p.name]


def test_an_unusable_cache_location_never_fails_a_request(
    plain: ServerThread, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("not a directory")
    pairs = pairs_of(3)
    with cached(tmp_path / "file" / "c.sqlite") as srv:
        assert refs(loss(srv, pairs)) == refs(loss(plain, pairs))
        assert grpc_refs(srv, pairs) == refs(loss(plain, pairs))
        assert metric(srv, 'dpo_reference_cache_errors_total{kind="open"}') == 1
        assert hits_misses(srv) == (0, 0)  # off: no lookups at all


def test_concurrent_requests_share_the_cache(plain: ServerThread, tmp_path: Path) -> None:
    """Six clients, overlapping pairs, loss-only requests coalesced with train steps between:
    every answer matches the recomputation; the rows are the distinct sequences."""
    pool = pairs_of(8, "x")
    jobs = [[pool[(i + k) % 8] for k in range(3)] for i in range(12)]
    expected = {json.dumps(p): refs(loss(plain, [p])) for p in pool}
    errors: list[str] = []
    results: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []
    with cached(tmp_path / "c.sqlite", max_wait_ms=20.0) as srv:

        def client(k: int) -> None:
            try:
                for job in jobs[k::6]:
                    results.append((job, loss(srv, job, train=(k == 0))))
            except BaseException as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and len(results) == 12
        hits, misses = hits_misses(srv)
        assert hits + misses == 12 * 3 * 2 and misses >= 16
        assert metric(srv, "dpo_reference_cache_entries") == 16
    for job, body in results:
        got = refs(body)
        n = len(job)
        for i, p in enumerate(job):
            want = expected[json.dumps(p)]
            assert [got[i], got[n + i]] == pytest.approx(want, rel=BATCH_RTOL, abs=0)


def test_precompute_then_an_epoch_of_only_hits(
    plain: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``dpo-service precompute-reference`` with the server's settings fills the cache; the
    training epoch that follows computes no reference pass (misses stay 0)."""
    path, pairs = tmp_path / "c.sqlite", pairs_of(9)[:7]  # text rows (the JSONL reader)
    pairs.append({  # a conversational row: the chat template renders it on both sides
        "prompt": [{"role": "user", "content": "hi there"}],
        "chosen": [{"role": "assistant", "content": "hello!"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    })  # fmt: skip
    data = tmp_path / "train.jsonl"
    too_long = {"prompt": "x" * 400, "chosen": "a", "rejected": "b"}  # > 256 positions
    data.write_text("".join(json.dumps(p) + "\n" for p in [*pairs[:4], too_long, *pairs[4:]]))
    for key, value in {**SMALL_MODEL, "reference_cache": str(path)}.items():
        monkeypatch.setenv(f"DPO_{key.upper()}", str(value))
    assert main(["precompute-reference", "--data", str(data), "--batch-pairs", "3"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["pairs"] == 9 and report["skipped"] == 1
    assert report["misses"] == 16 and report["entries"] == 16
    assert "reference log-probs" in err and "skipped a pair" in err  # progress bar, refusal
    assert main(["precompute-reference", "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr()[0])["hits"] == 16  # a second run computes nothing
    for key in SMALL_MODEL:
        monkeypatch.delenv(f"DPO_{key.upper()}")
    with cached(path) as srv:
        for start in range(0, 8, 4):
            body = loss(srv, pairs[start : start + 4], train=True)
            want = refs(loss(plain, pairs[start : start + 4]))
            assert refs(body) == pytest.approx(want, rel=BATCH_RTOL, abs=0)
        assert hits_misses(srv) == (16, 0)


def test_precompute_without_a_cache_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    monkeypatch.delenv("DPO_REFERENCE_CACHE", raising=False)
    monkeypatch.delenv("DPO_CHECKPOINT_DIR", raising=False)
    assert main(["precompute-reference", "--data", str(data)]) == 2
    assert "DPO_REFERENCE_CACHE" in capsys.readouterr().err


def test_the_default_cache_lives_in_the_checkpoint_dir_and_survives_a_resume(
    plain: ServerThread, tmp_path: Path
) -> None:
    """The frozen reference is the initial weights after a resume too: same identity, so the
    rows written before the restart are hits after it, and still equal a recomputation."""
    pairs, ckpt = pairs_of(4), tmp_path / "ckpt"
    settings = {"keep_reference": True, "checkpoint_dir": ckpt, "checkpoint_every": 1}
    with running_server(**settings) as srv:
        loss(srv, pairs, train=True)
        assert srv.version == 1 and hits_misses(srv) == (0, 8)
    assert (ckpt / "reference_cache.sqlite").is_file()
    with running_server(**settings) as srv:
        assert srv.version == 1  # resumed
        assert refs(loss(srv, pairs)) == refs(loss(plain, pairs))
        assert hits_misses(srv) == (8, 0)


def test_cache_io_runs_on_the_engine_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every lookup and write happens on the engine's worker thread, never the event loop."""
    from dpo_service.state.reference_cache import ReferenceCache

    threads: list[str] = []
    for name in ("get_many", "put_many"):
        original = getattr(ReferenceCache, name)

        def spy(self: Any, items: Any, _original: Any = original) -> Any:
            threads.append(threading.current_thread().name)
            return _original(self, items)

        monkeypatch.setattr(ReferenceCache, name, spy)
    with cached(tmp_path / "c.sqlite") as srv:
        loss(srv, pairs_of(3))
        loss(srv, pairs_of(3), train=True)
        grpc_refs(srv, pairs_of(3))
    assert len(threads) >= 4 and all(t.startswith("dpo-engine") for t in threads), threads
