"""Work spread over a Ray cluster (the optional extra `onnxprune[ray]`): `ray_map` runs `fn(shared, item)`
for every item on Ray's workers and returns the results in the items' order, as a loop would.

`shared` (a sweep's model and data) goes into Ray's object store once. One actor per CPU of the cluster
takes it; its calls are Ray tasks, one per item, handed to whichever actor is free. Each actor keeps
`shared` between its calls, so what `fn` caches on it (a sweep's scores and reference outputs) is
computed once per worker, not once per item.
"""

from __future__ import annotations

import logging
from typing import Callable

from .errors import UsageError, first_line

INSTALL = "pip install 'onnxprune[ray]'"


def require_ray():
    """The `ray` module; a UsageError naming the extra when it is not installed."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray: {INSTALL} (or leave out --ray to run on this machine)") from None
    return ray


def connect(address: str):
    """Ray, connected: to the session this process already has, else as `address` says ('auto': the cluster
    in RAY_ADDRESS or the last one started on this machine, else a new local instance of its cores)."""
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "auto" else address, logging_level=logging.WARNING,
                     log_to_driver=False, include_dashboard=False)
        except ConnectionError as exc:
            raise UsageError(f"--ray {address}: cannot reach a Ray cluster there ({first_line(exc)}); start one with "
                             "`ray start --head` or give its address, e.g. --ray 10.0.0.5:6379") from None
    return ray


class _Holder:
    """A Ray actor's state: the shared object, deserialised once, for every call on this worker."""

    def __init__(self, shared):
        import ray

        from . import runtime

        runtime.intra_op_threads = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
        self.shared = shared

    def call(self, fn: Callable, index: int, item):
        return index, fn(self.shared, item)


def worker_slots(ray, whole_machines: bool) -> list[dict]:
    """Ray resource options of each actor: one CPU each, as many as the cluster has CPUs; or, with
    `whole_machines`, one actor per machine holding all its CPUs, so that nothing else runs beside it
    (what a latency measurement needs)."""
    if not whole_machines:
        return [{"num_cpus": 1}] * max(1, int(ray.cluster_resources().get("CPU", 1)))
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return [{"num_cpus": node["Resources"]["CPU"],
             "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)}
            for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")]


def ray_map(fn: Callable, shared, items: list, address: str = "auto", whole_machines: bool = False,
            done: Callable = lambda: None) -> list:
    """[fn(shared, item) for item in items], computed on Ray workers (see the module docstring). Ray
    pickles `fn`: a module-level function by name, so the workers need this package installed. `done()`
    is called as each result arrives. An error raised by `fn` is raised here as it was raised there."""
    ray = connect(address)
    from ray.exceptions import RayTaskError
    from ray.util import ActorPool

    holder = ray.remote(_Holder)
    shared_ref = ray.put(shared)
    slots = worker_slots(ray, whole_machines)[:len(items)]
    actors = [holder.options(**slot).remote(shared_ref) for slot in slots]
    pool = ActorPool(actors)
    results = [None] * len(items)
    try:
        for index, result in pool.map_unordered(lambda actor, job: actor.call.remote(fn, *job), enumerate(items)):
            results[index] = result
            done()
    except RayTaskError as exc:
        raise exc.cause from None
    finally:  # the workers' memory back now, not when Ray collects the handles
        for actor in actors:
            ray.kill(actor)
    return results
