"""Optimizer.state as dicts that count their writes: a group's cached state lists and plan are
valid while the counter of their optimizer stays the same (each optimizer has its own)."""
from __future__ import annotations

from collections import defaultdict
from typing import List, Optional

def _after(cls, name: str, first):
    """``cls``'s method ``name``, run after ``first(self)`` (counting a write, settling before a
    read)."""
    base = getattr(cls, name)

    def method(self, *args, **kwargs):
        first(self)
        return base(self, *args, **kwargs)

    method.__name__ = name
    return method


def settle(pending) -> None:
    """Runs an optimizer's deferred work (Batch.deferred), oldest first, emptying the list."""
    while pending:
        pending.pop(0)()


def _count_write(self) -> None:
    self._epoch[0] += 1


class _ParamState(dict):
    """The state dict of one param: a dict that records that it was written, in ``_epoch``, the
    one-element counter of the optimizer whose state it is (its per-group caches are valid
    only while the counter stays the same; another optimizer's writes do not touch it)."""

    __slots__ = ("_epoch",)

    def __init__(self, *args, epoch: Optional[List[int]] = None):
        dict.__init__(self, *args)
        self._epoch = [0] if epoch is None else epoch

    # Methods call dict's own explicitly (not super()) so _State below can share them.
    def __setitem__(self, k, v):
        self._epoch[0] += 1
        dict.__setitem__(self, k, v)

    def __delitem__(self, k):
        self._epoch[0] += 1
        dict.__delitem__(self, k)

    clear = _after(dict, "clear", _count_write)
    pop = _after(dict, "pop", _count_write)
    popitem = _after(dict, "popitem", _count_write)
    setdefault = _after(dict, "setdefault", _count_write)
    update = _after(dict, "update", _count_write)
    __ior__ = _after(dict, "__ior__", _count_write)

    def __reduce__(self):  # pickles (and deep-copies) as a plain dict
        return (dict, (dict(self),))


class _State(defaultdict):
    """Optimizer.state: a defaultdict of _ParamState that records that it, or any param's state
    in it, was written (``_epoch``, shared with every _ParamState it holds). Reads settle the
    optimizer's deferred work first (``_deferred``, its Batch.deferred list): a count read after
    a step that found_inf skipped on the device is the count as it stands, not one ahead."""

    def __init__(self, *args):
        super().__init__(None, *args)
        self._epoch = [0]
        self._deferred: Optional[list] = None

    def _settle(self) -> None:
        if self._deferred:  # (every read of the state passes here: nothing more when empty)
            settle(self._deferred)

    __getitem__ = _after(defaultdict, "__getitem__", _settle)
    get = _after(defaultdict, "get", _settle)
    items = _after(defaultdict, "items", _settle)
    values = _after(defaultdict, "values", _settle)

    def __missing__(self, key):
        value = _ParamState(epoch=self._epoch)
        self[key] = value  # (a write: counted)
        return value

    __setitem__ = _ParamState.__setitem__
    __delitem__ = _ParamState.__delitem__
    clear = _ParamState.clear
    pop = _ParamState.pop
    popitem = _ParamState.popitem
    setdefault = _ParamState.setdefault
    update = _ParamState.update
    __ior__ = _ParamState.__ior__

    def __reduce__(self):
        return (defaultdict, (dict,), None, None, iter(self.items()))


def _tracked(state) -> _State:
    out = _State()
    for k, v in state.items():
        dict.__setitem__(out, k, _ParamState(v, epoch=out._epoch) if type(v) is dict else v)
    return out


def _epoch_of(state) -> int:
    """The write counter of an optimizer's state (-1 for a state that is not a _State, whose
    writes are not seen: its caches are never used)."""
    epoch = getattr(state, "_epoch", None)
    return -1 if epoch is None else epoch[0]
