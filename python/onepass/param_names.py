"""Which param a fault is about, in the user's terms: its position in its group, the group's
position, and its name where the group has ``param_names`` (onepass.param_groups and
torch's named params give them). The backends check batches, which hold a group's params with
grads split by state format, so their messages name a batch position (``grads[2]``); the
optimizer adds the param's own before the error reaches the user."""
from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence

import torch

# a batch list and its index, as validate_batch and reference.check_batch print them
_BATCH_INDEX = re.compile(r"\b(params|grads|exp_avgs|exp_avg_sqs|max_exp_avg_sqs|steps|"
                          r"exp_avg_absmaxs|exp_avg_sq_absmaxs|kahan_comps)\[(\d+)\]")


def where(group_index: int, group: Dict[str, Any], j: int) -> str:
    """``param j ('name') of param group g``."""
    names: Optional[Sequence[str]] = group.get("param_names")
    name = f" ({names[j]!r})" if names and j < len(names) else ""
    return f"param {j}{name} of param group {group_index}"


def name_fault(e: BaseException, group_index: int, group: Dict[str, Any],
               batch_params: Sequence[torch.Tensor]) -> None:
    """Puts ``where`` the param is in front of e's message (in place: the type and traceback
    stay) when the message names a position of a batch of ``batch_params``."""
    msg = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else None
    m = _BATCH_INDEX.search(msg) if msg is not None else None
    if m is None or "of param group" in msg:
        return
    i = int(m.group(2))
    if i >= len(batch_params):
        return
    p = batch_params[i]
    j = next((k for k, q in enumerate(group["params"]) if q is p), None)
    if j is None:
        return
    head = "onepass: " if msg.startswith("onepass: ") else ""
    e.args = (f"onepass: {where(group_index, group, j)}: {msg[len(head):]}",)
