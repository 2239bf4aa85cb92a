"""The dilated pattern (docs/semantics.md) as plain data: validation, head groups,
offsets, segment geometry and FLOP counts. Pure Python, no tensors."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ._checks import check_int

HeadMode = Literal["grouped", "all"]
HEAD_MODES: tuple[str, ...] = ("grouped", "all")

#: LongNet's base setting (paper, Table 7), the default of the factories.
LONGNET_SEGMENT_LENGTHS: tuple[int, ...] = (2048, 4096, 8192, 16384, 32768)
LONGNET_DILATION_RATES: tuple[int, ...] = (1, 2, 4, 6, 12)


def _positive_ints(name: str, values: object) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        # bool is an int subclass; True as a segment length is always a mistake
        if isinstance(v, bool):
            raise TypeError(f"{name}[{i}] must be an int, got bool ({v!r})")
        try:
            v = operator.index(v)
        except TypeError:
            raise TypeError(f"{name}[{i}] must be an int, got {type(v).__name__} ({v!r})") from None
        if v < 1:
            raise ValueError(f"{name}[{i}] must be >= 1, got {v}")
        out.append(v)
    if not out:
        raise ValueError(f"{name} must not be empty")
    return tuple(out)


@dataclass(frozen=True)
class BranchCall:
    """One batched attention problem of a branch: every segment of one length
    and every head that shares one offset, or (``offset_step = 1``) a run of
    consecutive heads whose offsets step by one.

    The queries of the call's head ``j`` (head ``head_start + head_step * j``,
    ``j < num_heads``) are positions ``start + s * segment_length + offset +
    offset_step * j + dilation * m`` for ``s < num_segments`` and ``m < length``
    (keys are the same positions). With ``offset_step = 0`` every head reads
    the same positions; with 1 the heads are one strided view all the same (head
    stride = the head stride plus the sequence stride): a diagonal.
    """

    branch: int
    offset: int
    dilation: int
    start: int
    segment_length: int
    num_segments: int
    length: int
    head_start: int
    head_step: int
    num_heads: int
    #: offset added per head (0: one offset for every head; 1: a diagonal)
    offset_step: int = 0

    def positions(self, j: int = 0) -> list[int]:
        """Sequence positions of the call's head ``j``, segment-major (``s``, then ``m``)."""
        first = self.start + self.offset + self.offset_step * j
        return [
            first + s * self.segment_length + self.dilation * m
            for s in range(self.num_segments)
            for m in range(self.length)
        ]

    def heads(self) -> list[int]:
        return [self.head_start + self.head_step * j for j in range(self.num_heads)]

    def head_offsets(self) -> list[int]:
        """The offset of each of the call's heads."""
        return [self.offset + self.offset_step * j for j in range(self.num_heads)]


@dataclass(frozen=True)
class DilatedPattern:
    """Branches ``(segment_lengths[i], dilation_rates[i])`` and the head mode.

    ``head_mode="grouped"``: heads are split into ``len(segment_lengths)``
    contiguous groups, the first ``h % k`` one head larger; group ``i`` uses only
    branch ``i`` with offset ``i % dilation_rates[i]``.
    ``head_mode="all"``: every head uses every branch; head ``j`` uses offset
    ``j % dilation_rates[i]`` in branch ``i``.

    ``head_start``/``total_heads``: the pattern of heads ``head_start ..`` of a
    layer of ``total_heads`` heads (a rank's heads under head parallelism,
    :meth:`head_slice`): local head ``j`` follows the rules as head
    ``head_start + j`` of ``total_heads``. By default the call's heads are the
    layer's.
    """

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    head_mode: HeadMode = "grouped"
    head_start: int = 0
    total_heads: int | None = None

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        head_mode: HeadMode = "grouped",
        *,
        head_start: int = 0,
        total_heads: int | None = None,
    ) -> None:
        seg = _positive_ints("segment_lengths", segment_lengths)
        dil = _positive_ints("dilation_rates", dilation_rates)
        if len(seg) != len(dil):
            raise ValueError(
                "segment_lengths and dilation_rates must have the same length, got "
                f"{len(seg)} segment_lengths and {len(dil)} dilation_rates"
            )
        if head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {head_mode!r}")
        check_int("head_start", head_start, 0)
        if total_heads is not None:
            check_int("total_heads", total_heads)
            if head_start >= total_heads:
                raise ValueError(f"head_start must be < total_heads = {total_heads}, got {head_start}")
        elif head_start:
            raise ValueError("head_start needs total_heads (the layer's number of heads)")
        object.__setattr__(self, "segment_lengths", seg)
        object.__setattr__(self, "dilation_rates", dil)
        object.__setattr__(self, "head_mode", head_mode)
        object.__setattr__(self, "head_start", head_start)
        object.__setattr__(self, "total_heads", total_heads)

    def head_slice(self, start: int, total_heads: int) -> DilatedPattern:
        """This pattern on heads ``start ..`` of a layer of ``total_heads`` heads."""
        return DilatedPattern(
            self.segment_lengths,
            self.dilation_rates,
            self.head_mode,
            head_start=start,
            total_heads=total_heads,
        )

    def op_args(self) -> tuple[list[int], list[int], str, list[int]]:
        """The pattern as arguments of a registered operator (which takes no
        objects): segment lengths, dilation rates, head mode, and ``[head_start,
        total_heads]`` of a head slice (empty: none)."""
        head_slice = [] if self.total_heads is None else [self.head_start, self.total_heads]
        return list(self.segment_lengths), list(self.dilation_rates), self.head_mode, head_slice

    @classmethod
    def from_op_args(
        cls, segment_lengths: list[int], dilation_rates: list[int], head_mode: str, head_slice: list[int]
    ) -> DilatedPattern:
        """The pattern of :meth:`op_args`."""
        start, total = (head_slice[0], head_slice[1]) if head_slice else (0, None)
        return cls(segment_lengths, dilation_rates, head_mode, head_start=start, total_heads=total)  # type: ignore[arg-type]

    @property
    def num_branches(self) -> int:
        return len(self.segment_lengths)

    def head_groups(self, num_heads: int) -> list[range]:
        """Contiguous head ranges of the grouped mode, one per branch (may be empty)."""
        check_int("num_heads", num_heads)
        k = self.num_branches
        base, extra = divmod(num_heads, k)
        groups, start = [], 0
        for i in range(k):
            size = base + (1 if i < extra else 0)
            groups.append(range(start, start + size))
            start += size
        return groups

    @property
    def merges_branches(self) -> bool:
        """Whether a head uses several branches, merged by lse ("all" mode), or
        exactly one (grouped mode, where the merge is the identity)."""
        return self.head_mode == "all"

    def head_offset(self, branch: int, head: int, num_heads: int) -> int | None:
        """Offset of ``head`` (of ``num_heads`` in the call) in ``branch``, or None
        if the head does not use it: the one place the head-offset rule lives
        (docs/semantics.md, "Heads and offsets"); every other offset in the
        package is derived from it."""
        total = num_heads if self.total_heads is None else self.total_heads
        if self.head_start + num_heads > total:
            raise ValueError(
                f"a call of {num_heads} heads from head {self.head_start} does not fit in the layer's "
                f"total_heads = {total}"
            )
        head = self.head_start + head  # the layer's head
        r = self.dilation_rates[branch]
        if self.merges_branches:
            return head % r
        return branch % r if head in self.head_groups(total)[branch] else None

    def branch_offsets(self, branch: int, num_heads: int) -> tuple[int | None, ...]:
        """:meth:`head_offset` of every head in ``branch``."""
        return tuple(self.head_offset(branch, j, num_heads) for j in range(num_heads))

    def branch_heads(self, branch: int, num_heads: int) -> list[tuple[int, range]]:
        """``(offset, heads)`` pairs of one branch, by offset; the heads sharing an
        offset form a strided range (step 1 in grouped mode, step ``r`` in "all"
        mode), so one strided view holds them."""
        by_offset: dict[int, list[int]] = {}
        for head, offset in enumerate(self.branch_offsets(branch, num_heads)):
            if offset is not None:
                by_offset.setdefault(offset, []).append(head)
        pairs = []
        for offset, heads in sorted(by_offset.items()):
            step = heads[1] - heads[0] if len(heads) > 1 else 1
            strided = range(heads[0], heads[-1] + 1, step)
            assert list(strided) == heads, "the heads of an offset must form a strided range"
            pairs.append((offset, strided))
        return pairs

    def segment_bounds(self, branch: int, seq_len: int) -> list[tuple[int, int]]:
        """``[start, end)`` of every segment of ``branch``; the last may be shorter."""
        check_int("seq_len", seq_len)
        w = self.segment_lengths[branch]
        return [(s, min(s + w, seq_len)) for s in range(0, seq_len, w)]

    def calls(self, seq_len: int, num_heads: int, *, diagonal: bool = False) -> list[BranchCall]:
        """The batched attention problems that compute the pattern on ``seq_len``
        positions and ``num_heads`` heads: per branch and offset, one call for the
        full segments and one for a shorter last segment.

        ``diagonal=True`` ("all" mode): where fewer calls result, a branch's heads
        are batched instead by runs of consecutive heads whose offsets step by one
        (``offset_step = 1``, cut where the length changes): LongNet's base pattern
        on 12 heads takes 12 calls instead of 25, W2's (16 heads, rates to 32) 11
        instead of 47. Such calls read each head at its own positions, so keys
        shared by several query heads (grouped-query attention) and per-position
        biases need the plain calls."""
        check_int("seq_len", seq_len)
        check_int("num_heads", num_heads)
        # dynamo traces through a cache wrapper, and warns: compiled code calls the function
        build = _calls.__wrapped__ if torch.compiler.is_compiling() else _calls
        return list(build(self, seq_len, num_heads, diagonal and self.merges_branches))

    def flops(
        self,
        seq_len: int,
        num_heads: int,
        head_dim: int,
        batch: int = 1,
        causal: bool = False,
        backward: bool = False,
    ) -> int:
        """Matmul FLOPs the pattern needs (QK^T and PV, 2 per multiply-add),
        counting only query-key pairs the pattern allows. ``backward=True`` adds
        the usual 2.5x of the forward for the backward pass (5 matmuls vs 2)."""
        check_int("head_dim", head_dim)
        check_int("batch", batch)
        pairs = 0
        for call in self.calls(seq_len, num_heads):
            m = call.length
            per_segment = m * (m + 1) // 2 if causal else m * m
            pairs += per_segment * call.num_segments * call.num_heads
        fwd = 4 * pairs * head_dim * batch
        return fwd * 7 // 2 if backward else fwd


@dataclass(frozen=True)
class BranchRows:
    """Where one branch's per-(position, head) results sit in a compact buffer of
    ``num_rows`` rows per head ("all" mode).

    Position ``p`` of head ``j`` is row ``(p // segment_length) * rows_per_segment
    + (p % segment_length) // dilation`` and has a result iff
    ``(p % segment_length) % dilation == offsets[j]``: the selected rows of a
    segment, one after another, whatever the head's offset.
    """

    segment_length: int
    dilation: int
    rows_per_segment: int
    num_rows: int
    #: every head's offset in the branch (:meth:`DilatedPattern.head_offset`)
    offsets: tuple[int, ...]

    def call_rows(self, call: BranchCall, first_head: int = 0) -> BranchCall:
        """``call`` in this buffer's coordinates (consecutive rows from its first
        segment's first row), for a buffer that holds heads from ``first_head`` on."""
        return dataclasses.replace(
            call,
            start=call.start // self.segment_length * self.rows_per_segment,
            segment_length=self.rows_per_segment,
            offset=0,
            offset_step=0,
            dilation=1,
            head_start=call.head_start - first_head,
        )


def compact_rows(
    pattern: DilatedPattern, calls: Sequence[BranchCall], seq_len: int, num_heads: int
) -> dict[int, BranchRows] | None:
    """Per branch, the :class:`BranchRows` that ``calls`` fill exactly: None unless
    ``pattern`` merges branches and ``calls`` are its calls on ``seq_len``
    positions and ``num_heads`` heads (each head at its offset, whole segments
    from position 0 and at most a shorter last one), each selected row exactly
    once (counted; the calls themselves must not overlap)."""
    if not pattern.merges_branches:
        return None
    rows = {}
    for branch, group in _by_branch(calls).items():
        offsets = pattern.branch_offsets(branch, num_heads)
        r = group[0].dilation
        w = max(c.segment_length for c in group)
        filled = 0
        for c in group:
            head_offsets = c.head_offsets()
            if (
                c.dilation != r
                or c.start % w
                or not (
                    c.segment_length == w or (c.num_segments == 1 and c.start + c.segment_length == seq_len)
                )
                or c.start + c.num_segments * c.segment_length > seq_len
                or c.head_start + c.head_step * (c.num_heads - 1) >= num_heads
                or any(offsets[j] != o for j, o in zip(c.heads(), head_offsets))
                or any(c.length != selected_count(c.segment_length, r, o) for o in head_offsets)
            ):
                return None
            filled += c.num_segments * c.length * c.num_heads
        full, rest = divmod(seq_len, w)
        selected = sum(
            full * selected_count(w, r, o) + (selected_count(rest, r, o) if rest else 0)
            for o in offsets
            if o is not None
        )
        if filled != selected or None in offsets:
            return None
        per_segment = math.ceil(w / r)
        rows[branch] = BranchRows(
            w,
            r,
            per_segment,
            math.ceil(seq_len / w) * per_segment,
            tuple(o for o in offsets if o is not None),
        )
    return rows


def _by_branch(calls: Sequence[BranchCall]) -> dict[int, list[BranchCall]]:
    """``calls`` grouped by branch, in order of first appearance."""
    groups: dict[int, list[BranchCall]] = {}
    for call in calls:
        groups.setdefault(call.branch, []).append(call)
    return groups


def whole_branch(rows: dict[int, BranchRows], calls: Sequence[BranchCall], num_heads: int) -> int | None:
    """The first branch of ``rows`` that one of ``calls`` fills alone: every one of
    ``num_heads`` heads at one offset, whole segments from position 0. That call's
    result, as ``(batch, segments, rows_per_segment, heads, ...)``, holds the
    branch's compact rows in their order, so a merge can read it instead of a copy."""
    by_branch = _by_branch(calls)
    for branch, br in rows.items():
        group = by_branch.get(branch, [])
        if len(group) != 1:
            continue
        c = group[0]
        if (
            c.start == 0
            and c.head_start == 0
            and c.head_step == 1
            and c.num_heads == num_heads
            and c.offset_step == 0
            and c.segment_length == br.segment_length
            and c.length == br.rows_per_segment
            and c.num_segments * br.rows_per_segment == br.num_rows
        ):
            return branch
    return None


def tiles_regions(calls: Sequence[BranchCall], seq_len: int, num_heads: int) -> bool:
    """Whether the calls' regions (each head's positions ``start`` to ``start +
    num_segments · segment_length``, selected or not) cover every (position, head)
    of ``seq_len × num_heads`` exactly once: then writing every call's region, its
    unselected rows as zeros, writes the whole result (grouped heads)."""
    return _tiles_regions(tuple(calls), seq_len, num_heads)


@functools.lru_cache(maxsize=256)
def _tiles_regions(calls: tuple[BranchCall, ...], seq_len: int, num_heads: int) -> bool:
    spans: list[list[tuple[int, int]]] = [[] for _ in range(num_heads)]
    for c in calls:
        for head in c.heads():
            if not 0 <= head < num_heads:
                return False
            spans[head].append((c.start, c.start + c.num_segments * c.segment_length))
    for head_spans in spans:
        end = 0
        for first, stop in sorted(head_spans):
            if first != end:
                return False
            end = stop
        if end != seq_len:
            return False
    return True


@functools.lru_cache(maxsize=256)
def _calls(pattern: DilatedPattern, seq_len: int, num_heads: int, diagonal: bool) -> tuple[BranchCall, ...]:
    """:meth:`DilatedPattern.calls`, kept: every forward asks for them, and building
    them is host time per call (docs/benchmarks.md)."""
    calls = []
    for i, (w, r) in enumerate(zip(pattern.segment_lengths, pattern.dilation_rates)):
        w_eff = min(w, seq_len)
        num_full, rest = divmod(seq_len, w_eff)
        blocks = [(0, w_eff, num_full)]
        if rest:
            blocks.append((num_full * w_eff, rest, 1))
        for offset, heads in pattern.branch_heads(i, num_heads):
            for start, seg_len, count in blocks:
                length = selected_count(seg_len, r, offset)
                if length == 0:
                    continue
                calls.append(
                    BranchCall(
                        branch=i,
                        offset=offset,
                        dilation=r,
                        start=start,
                        segment_length=seg_len,
                        num_segments=count,
                        length=length,
                        head_start=heads.start,
                        head_step=heads.step,
                        num_heads=len(heads),
                    )
                )
    return tuple(_diagonals(calls) if diagonal else calls)


def _diagonals(calls: list[BranchCall]) -> list[BranchCall]:
    """``calls`` with the calls of each (branch, segment block) replaced by runs of
    consecutive heads whose offsets step by one at equal length, where that gives
    fewer calls."""
    blocks: dict[tuple[int, int, int], list[BranchCall]] = {}
    for call in calls:
        blocks.setdefault((call.branch, call.start, call.segment_length), []).append(call)
    out: list[BranchCall] = []
    for block in blocks.values():
        # every head of the block with its offset and length
        per_head = sorted((h, c.offset, c.length) for c in block for h in c.heads())
        runs: list[list[tuple[int, int, int]]] = []
        for item in per_head:
            last = runs[-1][-1] if runs else None
            if last is not None and item[0] == last[0] + 1 and item[1] == last[1] + 1 and item[2] == last[2]:
                runs[-1].append(item)
            else:
                runs.append([item])
        if len(runs) >= len(block):
            out.extend(block)
            continue
        first = block[0]
        for run in runs:
            head, offset, length = run[0]
            out.append(
                dataclasses.replace(
                    first,
                    offset=offset,
                    length=length,
                    head_start=head,
                    head_step=1,
                    num_heads=len(run),
                    offset_step=1 if len(run) > 1 else 0,
                )
            )
    return out


def split_heads(calls: Sequence[BranchCall], chunk: int) -> list[BranchCall]:
    """``calls`` cut so that each lies within one chunk of ``chunk`` consecutive
    heads (``[0, chunk)``, ``[chunk, 2·chunk)``, ...)."""
    check_int("chunk", chunk)
    pieces = []
    for call in calls:
        done = 0
        while done < call.num_heads:
            first = call.head_start + call.head_step * done
            chunk_end = (first // chunk + 1) * chunk
            count = min(call.num_heads - done, (chunk_end - 1 - first) // call.head_step + 1)
            offset = call.offset + call.offset_step * done
            pieces.append(dataclasses.replace(call, head_start=first, num_heads=count, offset=offset))
            done += count
    return pieces


def kv_head(head: int, num_heads: int, kv_heads: int) -> int:
    """The key/value head that query ``head`` reads (grouped-query attention):
    consecutive query heads share one, ``head // (num_heads // kv_heads)``, as in
    flash-attn and SDPA's ``enable_gqa``. The one place this rule lives."""
    return head // (num_heads // kv_heads)


def split_for_kv(calls: Sequence[BranchCall], num_heads: int, kv_heads: int) -> list[BranchCall]:
    """``calls`` cut into parts whose query heads read key/value heads regularly:
    in each part, runs of the same number of consecutive query heads share one
    key/value head, and the key/value heads of successive runs are equally spaced
    (:func:`kv_call` gives them). Without grouped-query attention, ``calls``."""
    if kv_heads == num_heads:
        return list(calls)
    if any(call.offset_step for call in calls):
        raise ValueError(
            "diagonal calls (offset_step != 0) read each head at its own positions: "
            "keys shared by query heads need the plain calls"
        )
    parts = []
    for call in calls:
        kvs = [kv_head(j, num_heads, kv_heads) for j in call.heads()]
        i = 0
        while i < len(kvs):
            run = _run_length(kvs, i)
            end, step = i + run, None
            while end < len(kvs) and _run_length(kvs, end) == run:
                if step is not None and kvs[end] - kvs[end - 1] != step:
                    break
                step = kvs[end] - kvs[end - 1]
                end += run
            first = call.head_start + call.head_step * i
            parts.append(dataclasses.replace(call, head_start=first, num_heads=end - i))
            i = end
    return parts


def _run_length(values: list[int], start: int) -> int:
    end = start
    while end < len(values) and values[end] == values[start]:
        end += 1
    return end - start


def kv_call(call: BranchCall, num_heads: int, kv_heads: int) -> tuple[BranchCall, int]:
    """``(the same positions on the key/value heads that call's query heads read,
    query heads per key/value head)`` for a part of :func:`split_for_kv`: query
    head ``j`` of the part reads key/value head ``j // group`` of the returned call."""
    if kv_heads == num_heads:
        return call, 1
    kvs = [kv_head(j, num_heads, kv_heads) for j in call.heads()]
    group = _run_length(kvs, 0)
    count = call.num_heads // group
    step = kvs[group] - kvs[0] if count > 1 else 1
    assert call.num_heads % group == 0 and kvs == [kvs[0] + step * (j // group) for j in range(len(kvs))], (
        "call is not a part of split_for_kv"
    )
    return dataclasses.replace(call, head_start=kvs[0], head_step=step, num_heads=count), group


def selected_count(segment_length: int, dilation: int, offset: int) -> int:
    """Positions ``t < segment_length`` with ``t % dilation == offset``."""
    if offset >= segment_length:
        return 0
    return math.ceil((segment_length - offset) / dilation)


def as_pattern(
    segment_lengths: Sequence[int] | DilatedPattern,
    dilation_rates: Sequence[int] | None = None,
    head_mode: HeadMode = "grouped",
) -> DilatedPattern:
    """Accept a ready pattern or build one from its parts."""
    if isinstance(segment_lengths, DilatedPattern):
        if dilation_rates is not None:
            raise ValueError("dilation_rates must be None when a DilatedPattern is passed")
        return segment_lengths
    if dilation_rates is None:
        raise ValueError("dilation_rates is required with segment_lengths")
    return DilatedPattern(segment_lengths, dilation_rates, head_mode)
