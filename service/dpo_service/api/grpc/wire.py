"""Counting pairs and token ids in an encoded ``dpo.v1`` loss request, from its bytes.

A ``ComputeLossRequest`` of millions of packed ids is a few megabytes on the wire but a parsed
array of 8 bytes per id (and far more as Python objects). The server checks the counts here,
on the bytes, before it parses anything (:func:`check_wire_size`): a packed id list is counted
by its terminal bytes (every varint ends in a byte below 0x80), an unpacked one field by
field, and the number of fields scanned is bounded so that no encoding makes the scan slower
than a parse.
"""

from __future__ import annotations

from collections.abc import Iterator

from dpo_service.api.grpc.gen import dpo_service_pb2 as pb
from dpo_service.errors import ErrorCode, ServiceError, invalid

_TERMINAL_BYTES = bytes(range(0x80))  # the last byte of every varint is below 0x80
_SLICE = 1 << 20


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


class _Walk:
    """Reads protobuf wire fields, at most ``budget`` of them, so that no encoding makes the
    scan slower than a parse; ValueError for bytes that are not a valid message (or not one
    this scan can read in its budget)."""

    def __init__(self, data: bytes, budget: int) -> None:
        self.data = data
        self.budget = budget

    def fields(self, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """``(field number, wire type, start, end)`` of each field in ``data[pos:end]``."""
        data = self.data
        while pos < end:
            self.budget -= 1
            if self.budget < 0:
                raise ValueError("too many fields to scan")
            key, pos = _varint(data, pos)
            wire = key & 7
            if wire == 0:
                start, (_, nxt) = pos, _varint(data, pos)
            elif wire == 2:
                length, start = _varint(data, pos)
                nxt = start + length
            elif wire in (1, 5):
                start, nxt = pos, pos + (8 if wire == 1 else 4)
            else:
                raise ValueError(f"wire type {wire}")
            if nxt > end:
                raise ValueError("truncated field")
            yield key >> 3, wire, start, nxt
            pos = nxt

    def terminal_bytes(self, start: int, end: int) -> int:
        """Bytes below 0x80 in ``data[start:end]`` (= varints there), counted in 1 MiB slices."""
        n = 0
        for pos in range(start, end, _SLICE):
            chunk = self.data[pos : min(end, pos + _SLICE)]
            n += len(chunk) - len(chunk.translate(None, _TERMINAL_BYTES))
        return n

    def pair_ids(self, start: int, end: int) -> int:
        """Token ids in one encoded ``PreferencePair`` (``tokens`` is its field 2), packed
        (one terminal byte per id) or not (one field per id)."""
        n = 0
        for field, wire, s, e in self.fields(start, end):
            if field == 2 and wire == 2:
                for _, ids_wire, s2, e2 in self.fields(s, e):
                    if ids_wire == 2:
                        n += self.terminal_bytes(s2, e2)
                    elif ids_wire == 0:
                        n += 1
        return n


def check_wire_size(
    data: bytes, *, max_pairs: int, max_request_tokens: int, stream: bool = False
) -> None:
    """Refuse (INVALID_ARGUMENT) an encoded ``ComputeLossRequest`` (``stream``: a
    ``StreamComputeLossRequest``) with more pairs or token ids than the limits, from its bytes,
    before it is parsed: a message of millions of ids costs neither a parsed copy nor Python
    objects. Bytes that are not a protobuf message (truncated, overlong varints, groups, or
    more fields than any valid request has) are INVALID_ARGUMENT here already."""
    walk = _Walk(data, budget=16 * max_pairs + max_request_tokens + 256)
    pairs = total = 0
    try:
        regions = (
            [(s, e) for f, w, s, e in walk.fields(0, len(data)) if f == 1 and w == 2]
            if stream
            else [(0, len(data))]
        )
        for start, end in regions:
            for field, wire, s, e in walk.fields(start, end):
                if field != 1 or wire != 2:
                    continue
                pairs += 1
                if pairs <= max_pairs:
                    total += walk.pair_ids(s, e)
    except ValueError as exc:  # as the parser would say, before it parses millions of ids
        if pairs > max_pairs:
            raise invalid("pairs", f"more than the limit of {max_pairs} pairs") from None
        name = (pb.StreamComputeLossRequest if stream else pb.ComputeLossRequest).DESCRIPTOR
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT, f"the message is not a valid {name.full_name}: {exc}"
        ) from None
    if pairs > max_pairs:
        raise invalid("pairs", f"{pairs} pairs, more than the limit of {max_pairs}")
    if total > max_request_tokens:
        raise invalid(
            "pairs", f"the request has {total} tokens, more than the limit of {max_request_tokens}"
        )
