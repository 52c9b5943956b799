"""Is a compute replica (or its prefetch worker) dead? Ask Ray, not a timer.

A replica's published state stops refreshing when its process dies, but also while it is
merely stalled (a long step, a paused VM). The router asks Ray about the replica's actors
once the state is a second old: a killed actor's call fails at once (Ray saw its process
exit), a slow one just has not answered yet. Only a confirmed death, or silence past
`replica_timeout_s`, makes the router resume the replica's requests elsewhere.
"""

from __future__ import annotations

import ray
from ray.exceptions import RayActorError


def actors_alive(names: tuple[str, ...], namespace: str, timeout_s: float = 1.0) -> bool:
    """False if Ray reports any of these named actors dead; True while they answer, or
    are only slow to (no answer within `timeout_s` is not evidence of death)."""
    refs = []
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=namespace or None)
        except ValueError:  # the name is gone: its actor died and was cleaned up
            return False
        refs.append(handle.__ray_ready__.remote())
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        try:
            ray.get(ref)
        except RayActorError:
            return False
    return True
