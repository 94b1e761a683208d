"""Issue 13, the pieces of the torchrun world that need no second process: how pairs are
split and encoded, how the parallel scheme is chosen, the launcher convenience and the
torchrun settings. (The world itself: ``test_distributed.py``.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpo_service.cli import torchrun_argv
from dpo_service.engine.distributed import parallel
from dpo_service.engine.distributed.sharded import positions, share_of
from dpo_service.engine.distributed.wire import decode_pairs, encode_pairs
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import PairTokens

ids = st.lists(st.integers(0, 2**40), min_size=1, max_size=6)


@given(st.lists(st.tuples(ids, ids, ids), max_size=8))
def test_pairs_survive_their_tensor_encoding(raw: list[tuple[list[int], ...]]) -> None:
    pairs = [PairTokens(list(a), list(b), list(c)) for a, b, c in raw]
    lengths, flat = encode_pairs(pairs)
    assert lengths.dtype == flat.dtype == torch.int64
    assert decode_pairs(lengths, flat) == pairs


@given(st.integers(1, 40), st.integers(1, 8))
def test_every_pair_of_a_micro_batch_goes_to_exactly_one_rank(g: int, size: int) -> None:
    """Shares partition the micro-batch; a rank with nothing runs a stand-in (the first
    pair, flagged), and ``positions`` are where each share's rows sit in the batch."""
    group = list(range(100, 100 + g))
    seen: list[int] = []
    for rank in range(size):
        mine, stand_in = share_of(group, rank, size)
        assert stand_in == (rank >= g)
        if stand_in:
            assert mine == [group[0]] and positions(group, rank, size) == []
        else:
            assert [group[p] for p in positions(group, rank, size)] == mine
            seen += mine
    assert sorted(seen) == group


def test_the_convenience_flag_becomes_a_torchrun_command() -> None:
    argv = ["serve", "--nproc-per-node", "2", "--port", "9000", "--nproc-per-node=2"]
    command = torchrun_argv(argv, 2)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[5:] == ["-m", "dpo_service", "serve", "--port", "9000"]


def test_torchrun_sets_the_world_through_its_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    s = Settings()
    assert (s.world_size, s.rank, s.local_rank, s.local_world_size) == (4, 3, 1, 2)
    monkeypatch.setenv("DPO_PARALLEL", "zero3")
    with pytest.raises(ValueError, match="parallel"):
        Settings()


def test_auto_takes_ddp_when_the_training_state_fits_else_fsdp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """16 bytes per trainable float32 parameter plus the frozen copy, against 80% of the
    memory one local rank may use (here: CPU RAM, faked small; no other way to run out)."""
    model = torch.nn.Linear(100, 100)  # 10,100 parameters: 161,600 + 40,400 bytes
    settings = Settings(parallel="auto", local_world_size=2)
    need = 10_100 * 16 + 10_100 * 4
    cpu = torch.device("cpu")
    monkeypatch.setattr(parallel, "_available_cpu_bytes", lambda: int(2 * need / 0.8) + 2)
    assert parallel.choose_parallel(settings, model, cpu, has_reference=True) == "ddp"
    monkeypatch.setattr(parallel, "_available_cpu_bytes", lambda: int(2 * need / 0.8) - 2)
    assert parallel.choose_parallel(settings, model, cpu, has_reference=True) == "fsdp"
    assert (
        parallel.choose_parallel(settings.model_copy(update={"parallel": "ddp"}), model, cpu, True)
        == "ddp"
    )


def test_a_bad_rank_count_is_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dpo_service.cli import main

    assert main(["serve", "--nproc-per-node", "0"]) == 2
    assert "--nproc-per-node must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not a number
        main(["serve", "--nproc-per-node", "two"])
