"""GRPO's rollout and reward workers as Ray actors, with bounded restarts (`grpo.ray=true`, the default).

    ray_session(address)        ray.init(): a local Ray bound to 127.0.0.1 with the dashboard off, or the cluster at
                                `address` (grpo.ray_address); an address that does not answer is a clear error
    RayRollouts(n, ...)         n rollout actors, each a `RolloutWorker` (its own policy copy and Engine, on CPU or
                                on `gpus` GPUs of Ray's: grpo.rollout_gpus); the same
                                `load_weights(state_dict, version)` / `generate(...)` as the in-process worker
    RayRewards(n, timeout, ...) n reward actors, each scoring its share of the completions with `score_completions`

Weights are put in Ray's object store once per sync and every rollout actor copies them in. The prompts of a
step are cut into contiguous runs of whole groups, one per actor, and the results put back in order, so the
samples are the same whatever the number of actors (each completion's seed is its own).

Failures. Ray restarts an actor whose process died (`max_restarts`); the restarted actor holds no weights. A call
that fails because its actor died (or came back empty) is retried on that actor after sending it the current weights
again, at most `retries` times in a row; then the run stops with an error that names the actor (its role, index and
the last error). A retried rollout call continues from its rollout WAL (`<wal_key>-actor<i>`, inference/wal.py): the
tokens its first life sampled are not sampled again. A reward function that merely raises never gets that far:
`safe_reward` turns it into a 0 with a reason inside the actor."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import torch

from dsv4train.config.errors import ConfigError
from dsv4train.inference.sampling import SamplingParams
from dsv4train.posttrain.grpo.rollout import Rollout, RolloutWorker
from dsv4train.posttrain.rewards.scoring import RewardFn, score_completions


@contextlib.contextmanager
def ray_session(address: str = "", num_cpus: int | None = None, connect_timeout_s: float = 30.0):
    """Ray for the run: started locally (127.0.0.1, no dashboard) when `address` is empty, else joined; shut down
    at the end if this session started it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "grpo.ray=true needs Ray: pip install 'dsv4train[ray]' (ray==2.60.0), or run rollouts and rewards in "
            "this process with grpo.ray=false"
        ) from None
    if address:
        _check_reachable(address, connect_timeout_s)
    if ray.is_initialized():  # a caller (a test, a notebook) already runs one: use it
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local session of one user; the cluster sets its own
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(_node_ip_address="127.0.0.1", num_cpus=num_cpus, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError) as e:
        where = f"the Ray cluster at grpo.ray_address={address}" if address else "a local Ray"
        raise ConfigError(
            f"could not start or join {where}: {type(e).__name__}: {e}. Check that the head node runs "
            "(`ray status` on it), or leave grpo.ray_address empty for a local Ray, or set grpo.ray=false"
        ) from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout_s: float) -> None:
    """A host:port that answers a TCP connection within `timeout_s` ("auto" and "ray://" addresses are left to Ray)."""
    import socket

    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"grpo.ray_address={address}: expected host:port of the Ray head (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"grpo.ray_address={address} does not answer ({e}); start the head with `ray start --head` "
            "(launchers/ray/) or fix the address"
        ) from None


class _RolloutActor:
    """The Ray actor body: one RolloutWorker."""

    def __init__(self, *args, **kwargs):
        torch.set_num_threads(kwargs.pop("threads", 1))
        self.worker = RolloutWorker(*args, **kwargs)

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        self.worker.load_weights(state_dict, version)
        return os.getpid()

    def generate(self, prompts, group_size: int, params: SamplingParams, seeds, wal_key=None) -> list[Rollout]:
        return self.worker.generate(prompts, group_size, params, seeds, wal_key)

    def pid(self) -> int:
        return os.getpid()


class _RewardActor:
    def __init__(self, workers: int):
        self.workers = workers

    def score(self, jobs: Sequence[tuple[RewardFn, str]], timeout_s: float) -> list[tuple[float, str]]:
        return score_completions(jobs, timeout_s, self.workers)

    def pid(self) -> int:
        return os.getpid()


RESTART_TIMEOUT_S = 300.0  # how long a restarting actor may take to answer again (it imports torch, builds a model)


def _dead(error: BaseException) -> bool:
    """The actor's process died (or is restarting): the call did not run to its end there."""
    import ray

    e = ray.exceptions
    return isinstance(error, (e.RayActorError, e.WorkerCrashedError, e.ActorUnavailableError))


def _wait_until_back(actor, timeout_s: float = RESTART_TIMEOUT_S) -> None:
    """Block until a restarted actor answers (Ray queues calls to an actor that is restarting, or refuses them with
    ActorUnavailableError while it is; either way ask again until the deadline)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.pid.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except Exception as e:
            if not _dead(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class _Pool:
    """n actors of one role with the retry rule of the module docstring."""

    def __init__(self, role: str, actor_class, n: int, retries: int, options: dict, *args, **kwargs):
        import ray

        if n < 1:
            raise ValueError(f"{role}: at least one actor, got {n}")
        self.role, self.retries = role, retries
        remote = ray.remote(actor_class).options(max_restarts=retries, max_task_retries=0, **options)
        self.actors = [remote.remote(*args, **kwargs) for _ in range(n)]

    def call_all(self, calls: list[Callable], recover: Callable[[int], None] | None = None) -> list:
        """`calls[i](actor i)` -> an ObjectRef, for every i, gathered; a dead actor's call is recovered and retried."""
        import ray

        refs = [call(actor) for call, actor in zip(calls, self.actors)]
        results = []
        for i, ref in enumerate(refs):
            for attempt in range(self.retries + 1):
                try:
                    results.append(ray.get(ref))
                    break
                except Exception as e:
                    if not _dead(e) or attempt == self.retries:
                        raise RuntimeError(
                            f"{self.role} actor {i} failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
                            + (f" after {attempt} restart(s), the limit (grpo.actor_retries)" if _dead(e) else "")
                        ) from e
                    _wait_until_back(self.actors[i])
                    if recover is not None:
                        recover(i)
                    ref = calls[i](self.actors[i])
        return results


class RayRollouts:
    """`n` rollout actors (module docstring); the same interface as `RolloutWorker`."""

    def __init__(
        self,
        n: int,
        retries: int,
        model_cfg,
        max_batch: int,
        max_len: int,
        tokenizer,
        compile: bool,
        wal_dir=None,
        wal_fsync: bool = False,
        gpus: float = 0.0,
    ):
        self.pool = _Pool(
            "rollout",
            _RolloutActor,
            n,
            retries,
            {"num_cpus": 1, "num_gpus": gpus},  # Ray sets the actor's CUDA_VISIBLE_DEVICES: "cuda" is its own GPU
            model_cfg,
            max_batch,
            max_len,
            "cuda" if gpus > 0 else "cpu",
            tokenizer,
            compile,
            wal_dir,
            wal_fsync,
        )
        self.version, self._weights = -1, None

    def load_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        import ray

        self._weights = ray.put({k: v.detach().cpu() for k, v in state_dict.items()})
        self.version = version
        self.pool.call_all([self._sync_call() for _ in self.pool.actors], self._resync)

    def _sync_call(self):
        return lambda actor: actor.load_weights.remote(self._weights, self.version)

    def _resync(self, i: int) -> None:
        import ray

        ray.get(self.pool.actors[i].load_weights.remote(self._weights, self.version))

    def generate(self, prompts, group_size: int, params: SamplingParams, seeds, wal_key=None) -> list[Rollout]:
        """`RolloutWorker.generate`; actor i's part of the call logs to the WAL `<wal_key>-actor<i>`, which its retry
        after a restart resumes from."""
        n = len(self.pool.actors)
        bounds = [round(i * len(prompts) / n) for i in range(n + 1)]
        calls = [
            (
                lambda actor, lo=lo, hi=hi, i=i: actor.generate.remote(
                    list(prompts[lo:hi]),
                    group_size,
                    params,
                    list(seeds[lo * group_size : hi * group_size]),
                    None if wal_key is None else f"{wal_key}-actor{i}",
                )
            )
            for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
        ]
        parts = self.pool.call_all(calls, self._resync)
        return [
            Rollout(r.group + lo, r.prompt_ids, r.completion, r.version)
            for part, lo in zip(parts, bounds[:-1])
            for r in part
        ]


class RayRewards:
    def __init__(self, n: int, retries: int, threads_per_actor: int):
        self.pool = _Pool("reward", _RewardActor, n, retries, {"num_cpus": 0}, threads_per_actor)

    def score(self, jobs: Sequence[tuple[RewardFn, str]], timeout_s: float) -> list[tuple[float, str]]:
        n = len(self.pool.actors)
        bounds = [round(i * len(jobs) / n) for i in range(n + 1)]
        calls = [
            (lambda actor, lo=lo, hi=hi: actor.score.remote(list(jobs[lo:hi]), timeout_s))
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ]
        return [s for part in self.pool.call_all(calls) for s in part]
