"""``dpo-service precompute-reference``: fill the reference log-prob cache for a dataset.

The model is loaded exactly as the server loads it (same ``DPO_*`` settings, so the same
reference identity and the same cache file), with the frozen reference kept; checkpoints are
not resumed (the frozen reference is the initial weights either way). Pairs are prepared with
the server's own :func:`~dpo_service.engine.preparation.prepare` (same tokenization and
limits), then looked up in batches: the misses get the reference pass and are stored.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpo_service.engine.admission import make_engine
from dpo_service.engine.preparation import prepare
from dpo_service.errors import ServiceError
from dpo_service.schemas import LossRequest
from dpo_service.settings import Settings
from modern_llm.alignment.logprobs import PairTokens


@dataclass
class PrecomputeReport:
    """What a run did: pairs seen, skipped (refused by the server's checks), and sequence
    hits / misses (a miss was computed and stored)."""

    pairs: int = 0
    skipped: int = 0
    hits: int = 0
    misses: int = 0
    entries: int = 0
    path: str = ""


def _progress(total: int) -> Any:
    """A tqdm bar on stderr when tqdm is installed, else a plain progress line."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="pair", desc="reference log-probs", file=sys.stderr)
    except ImportError:
        return _PlainProgress(total)


class _PlainProgress:
    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def update(self, n: int) -> None:
        self.done += n
        print(f"\rreference log-probs: {self.done}/{self.total} pairs", end="", file=sys.stderr)

    def close(self) -> None:
        print(file=sys.stderr)


def _prepared(
    pairs: Sequence[dict[str, Any]], prep: Callable[[list[Any]], Any]
) -> tuple[list[PairTokens], int]:
    """The tokenized pairs of one batch; a batch the checks refuse is retried pair by pair,
    and the refused pairs are skipped (counted)."""
    try:
        return list(prep(list(pairs)).pairs), 0
    except (ServiceError, ValueError):  # ValueError: pydantic's, a pair of the wrong shape
        out: list[PairTokens] = []
        for pair in pairs:
            try:
                out.extend(prep([pair]).pairs)
            except (ServiceError, ValueError) as exc:
                print(f"\nskipped a pair: {exc}", file=sys.stderr)
        return out, len(pairs) - len(out)


def precompute_reference(
    settings: Settings, pairs: Sequence[dict[str, Any]], *, batch_pairs: int = 32,
    progress: bool = True,
) -> PrecomputeReport:  # fmt: skip
    """Fill the cache at ``settings.reference_cache_path`` for ``pairs`` (request-shaped
    dicts: ``prompt``/``chosen``/``rejected`` as text or token ids). Raises ValueError when
    no cache is configured."""
    path = settings.reference_cache_path
    if path is None:
        raise ValueError("no reference cache: set DPO_REFERENCE_CACHE or DPO_CHECKPOINT_DIR")
    run = settings.model_copy(
        update={"keep_reference": True, "reference_cache": str(path), "checkpoint_dir": None}
    )
    engine = make_engine(run)
    engine.load()
    lookup, state = engine.reference_lookup, engine.state
    assert lookup is not None and state is not None and state.reference is not None
    limits, tokenizer = engine.limits(), state.bundle.tokenizer
    step = max(1, min(batch_pairs, run.max_pairs_per_request))
    report = PrecomputeReport(path=str(path))
    bar = _progress(len(pairs)) if progress else None

    def prep(batch: list[Any]) -> Any:
        return prepare(LossRequest(pairs=batch, reference="frozen"), tokenizer, limits)

    try:
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            tokens, skipped = _prepared(chunk, prep)
            report.skipped += skipped
            if tokens:
                stored = lookup.cache.get_many(lookup.keys(tokens))
                report.hits += sum(v is not None for v in stored)
                report.misses += sum(v is None for v in stored)
                with torch.inference_mode():
                    lookup.logps(state.reference, tokens, run, state.bundle)
            report.pairs += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        report.entries = lookup.cache.entries
        lookup.close()
    return report
