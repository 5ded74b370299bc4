"""Per-record memo of what the distillation terms derive from fixed teacher outputs.

When the teacher's outputs come from the teacher cache, a record's teacher tokens are the
same on every epoch, and so is everything a term computes from them with fixed maps:
mhca's fixed value projection ``R LN(x_t)`` (and its principal coordinates under
``teacher_rank``), ot's fixed projection and its L2 normalisation. Recomputing them on
every step was a third of what those terms cost for a small student
(``benchmarks/losses.py --memo``). A :class:`TeacherMemo` keeps them per record, in
memory, for one training job: the first epoch computes and stores them, later epochs read
them (one gather instead of a layer norm and a matrix product).

The values are the same computations on the same inputs (row-wise maps of each token), so
the stored rows equal the recomputed ones to float rounding. A store is tied to the fixed
matrix it was made with (its storage and version counter): writing or replacing that
buffer starts the store again. Stores are kept on the CPU only (on an accelerator the maps
cost little and its memory is better spent on batches) and within a byte budget: a store
that would not fit is not made, and its values are computed every step, as without memo.

The objective enables the memo for a batch by placing ``(memo, record_index,
teacher_tokens)`` under :data:`MEMO_KEY` in its context; the training job does so only when
the teacher outputs of a record cannot change (a single-draw cache, no transfer records).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

MEMO_KEY = "teacher.memo"  # the objective context entry: (TeacherMemo, index [B], tokens)
DEFAULT_BUDGET_MB = 2048  # at most this, and at most 1/8 of the machine's memory
BUDGET_ENV = "ECG_DISTILL_TEACHER_MEMO_MB"  # overrides the budget (0: no memo)


def default_budget() -> int:
    """Bytes a memo may hold: ``$ECG_DISTILL_TEACHER_MEMO_MB`` if set, else the smaller of
    2 GiB and an eighth of the machine's physical memory."""
    if os.environ.get(BUDGET_ENV):
        return int(float(os.environ[BUDGET_ENV]) * 2**20)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        total = 8 * DEFAULT_BUDGET_MB * 2**20
    return min(DEFAULT_BUDGET_MB * 2**20, total // 8)


class _Store:
    """One memoised quantity: ``data`` [records, *row shape] tensors (one per output of
    the compute function) and which records hold a value."""

    def __init__(self, values: tuple[torch.Tensor, ...], records: int,
                 guard: torch.Tensor | None) -> None:
        self.data = tuple(torch.empty((records, *v.shape[1:]), dtype=v.dtype) for v in values)
        self.filled = torch.zeros(records, dtype=torch.bool)
        self.guard = _guard_state(guard)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data)


def _guard_state(guard: torch.Tensor | None) -> tuple[int, int, torch.dtype] | None:
    if guard is None:
        return None
    return guard.untyped_storage().data_ptr(), guard._version, guard.dtype


class TeacherMemo:
    """Per-record values derived from fixed teacher outputs, for one training job.

    Args:
        records: how many records the record indices address (the data set's length).
        budget: the most bytes all stores together may hold (default
            :func:`default_budget`).

    ``hits`` and ``misses`` count the batches read whole from the memo and those with rows
    to compute; ``computed`` counts the rows computed.
    """

    def __init__(self, records: int, budget: int | None = None) -> None:
        self.records = int(records)
        self.budget = default_budget() if budget is None else int(budget)
        self._stores: dict[str, _Store | None] = {}  # None: did not fit the budget
        self.hits = self.misses = self.computed = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the stores."""
        return sum(s.nbytes for s in self._stores.values() if s is not None)

    def rows(self, name: str, index: torch.Tensor,
             compute: Callable[[torch.Tensor | None], torch.Tensor | tuple[torch.Tensor, ...]],
             guard: torch.Tensor | None = None) -> Any:
        """The values of ``name`` for the records ``index``: those stored are read, the others
        computed (``compute(rows)``) and stored.

        Args:
            name: what is memoised (include the dtype and anything else it depends on).
            index: [B] int64 record indices, in [0, records).
            compute: given the batch positions [M] to compute (None: all B), their values
                without a graph, a tensor or a tuple of tensors [M, ...], row m for the
                record ``index[rows[m]]``.
            guard: the fixed tensor the values were made with; the store is emptied when
                it is replaced or written in place.

        Returns:
            a tensor or a tuple as ``compute`` gives, for the whole batch.
        """
        store = self._stores.get(name)
        if store is not None and store.guard != _guard_state(guard):
            del self._stores[name]  # the fixed map changed: start again
            store = None
        index = index.to("cpu", torch.long)
        if store is not None:
            missing = (~store.filled[index]).nonzero().flatten()  # (M,) batch positions
            if len(missing) == 0:
                self.hits += 1
                return _single(tuple(t.index_select(0, index) for t in store.data))
            self.misses += 1
            self.computed += len(missing)
            if len(missing) == len(index):
                return self._store(store, index, compute(None))
            self._store(store, index[missing], compute(missing))
            return _single(tuple(t.index_select(0, index) for t in store.data))
        self.misses += 1
        self.computed += len(index)
        value = compute(None)
        if name not in self._stores:  # the first batch: made if it fits the budget
            values = value if isinstance(value, tuple) else (value,)
            per_record = sum(v[:1].numel() * v.element_size() for v in values)
            fits = all(v.device.type == "cpu" for v in values) and \
                self.nbytes + per_record * self.records <= self.budget
            self._stores[name] = _Store(values, self.records, guard) if fits else None
            if fits:
                self._store(self._stores[name], index, value)
        return value

    @staticmethod
    def _store(store: _Store, index: torch.Tensor, value: Any) -> Any:
        for t, v in zip(store.data, value if isinstance(value, tuple) else (value,)):
            t[index] = v.detach()
        store.filled[index] = True
        return value

    def clear(self) -> None:
        """Drop every store."""
        self._stores.clear()

    def __deepcopy__(self, memo: dict[int, Any]) -> TeacherMemo:
        return TeacherMemo(self.records, self.budget)  # a copy starts empty

    def __getstate__(self) -> dict[str, Any]:
        return {"records": self.records, "budget": self.budget}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["records"], state["budget"])

    def __repr__(self) -> str:
        held = sorted(k for k, v in self._stores.items() if v is not None)
        return (f"TeacherMemo(records={self.records}, budget={self.budget}, "
                f"stores={held}, bytes={self.nbytes})")


def _single(values: tuple[torch.Tensor, ...]) -> Any:
    return values if len(values) > 1 else values[0]


def memoised(context: dict[str, Any] | None, tokens: torch.Tensor, name: str,
             compute: Callable[[torch.Tensor], Any], guard: torch.Tensor | None = None,
             subset: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
    """``compute(tokens)``, or its rows read from the objective's memo.

    ``compute`` must map each token on its own (row-wise along dim 1: a layer norm, a
    matrix product, a normalisation), so that the values for a subset of the token
    positions are those of all tokens at these positions.

    Args:
        context: the objective's context (None: computed).
        tokens: [B, N, D] the teacher tokens of the batch, or the subset ``subset`` names.
        name: what is memoised (see :meth:`TeacherMemo.rows`).
        compute: tokens [B, N', D] -> a tensor [B, N', ...] or a tuple of such.
        guard: the fixed tensor the values depend on.
        subset: (subset tokens, positions [K]) when ``tokens`` is that subset of the batch's
            teacher tokens (``teacher_subset``), or None.

    Returns:
        as ``compute``; computed when there is no memo for this batch or ``tokens`` is not
        (a subset of) the tokens it was given.
    """
    entry = None if context is None else context.get(MEMO_KEY)
    if entry is None:
        return compute(tokens)
    memo, index, full = entry
    positions = None
    if tokens is not full:
        if subset is None or subset[0] is not tokens:
            return compute(tokens)
        positions = subset[1]
    value = memo.rows(name, index, lambda rows: compute(
        full if rows is None else full.index_select(0, rows.to(full.device))), guard)
    if positions is None:
        return value
    if isinstance(value, tuple):
        return tuple(v.index_select(1, positions) for v in value)
    return value.index_select(1, positions)


__all__ = ["MEMO_KEY", "TeacherMemo", "default_budget", "memoised"]
