"""The policies: where sparse blocks come from. The registry below is the only place that names them.

Add a policy: a folder with its options dataclass, its `Policy` subclass and its plans
(`base.py` says what each provides), and one line here.
"""
from __future__ import annotations

from .base import Policy
from .dfsattn.policy import DFSAttnPolicy
from .west_fast.policy import WestFastPolicy

POLICIES: dict[str, type[Policy]] = {policy.name: policy for policy in (WestFastPolicy, DFSAttnPolicy)}
DEFAULT_POLICY = WestFastPolicy.name


def policy_class(name: str) -> type[Policy]:
    """The policy called `name` (the `policy` option), or a ValueError naming the option."""
    if name not in POLICIES:
        raise ValueError(f"option 'policy' must be one of {', '.join(map(repr, POLICIES))}, got {name!r}")
    return POLICIES[name]
