"""GRPO's Ray actors (dsv4train/posttrain/grpo/ray_actors.py): two rollout and two reward actors give the samples
one in-process worker gives, a rollout actor killed between calls comes back with the weights and the run goes on,
one killed in the middle of a call continues its requests from the rollout WAL,
and an actor that keeps dying, or a Ray address that does not answer, stops with an error that names it."""

import json
import os
import signal
import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from dsv4train.config.errors import ConfigError  # noqa: E402
from dsv4train.config.hydra_entry import compose_config  # noqa: E402
from dsv4train.inference.sampling import SamplingParams  # noqa: E402
from dsv4train.models.model import DSV4Model  # noqa: E402
from dsv4train.posttrain.grpo.controller import grpo  # noqa: E402
from dsv4train.posttrain.grpo.ray_actors import RayRewards, RayRollouts, ray_session  # noqa: E402
from dsv4train.posttrain.grpo.rollout import RolloutWorker  # noqa: E402
from dsv4train.testing.toy_configs import tiny_config  # noqa: E402
from tests.e2e.test_grpo_e2e import QUIET, SMALL, _prompts, base  # noqa: E402, F401  (base: the fixture)

pytestmark = pytest.mark.e2e
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors import nothing from tests/


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (ray_session reuses a running one); 4 logical CPUs for 2 + 2 actors."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    yield
    ray.shutdown()


def _model() -> DSV4Model:
    model = DSV4Model(tiny_config(vocab_size=64, max_seq_len=64, n_mtp_layers=0))
    model.init_weights(0)
    return model


PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
SEEDS = list(range(100, 112))  # 4 prompts x 3


def _local(model):
    worker = RolloutWorker(model.cfg, 16, 64)
    worker.load_weights(model.state_dict(), 5)
    return worker.generate(PROMPTS, 3, PARAMS, SEEDS)


def _same(got, want) -> None:
    assert [r.group for r in got] == [r.group for r in want]
    assert [r.completion.token_ids for r in got] == [r.completion.token_ids for r in want]
    assert all(r.version == 5 for r in got)


def test_two_rollout_actors_give_the_samples_of_one_worker(local_ray):
    model = _model()
    rollouts = RayRollouts(2, 1, model.cfg, 16, 64, None, False)
    rollouts.load_weights(model.state_dict(), 5)
    _same(rollouts.generate(PROMPTS, 3, PARAMS, SEEDS), _local(model))


def test_a_killed_rollout_actor_restarts_gets_the_weights_again_and_the_call_completes(local_ray):
    model = _model()
    rollouts = RayRollouts(1, 2, model.cfg, 16, 64, None, False)
    rollouts.load_weights(model.state_dict(), 5)
    pid = ray.get(rollouts.pool.actors[0].pid.remote())
    os.kill(pid, signal.SIGKILL)
    _same(rollouts.generate(PROMPTS, 3, PARAMS, SEEDS), _local(model))  # same weights: re-sent after the restart
    assert ray.get(rollouts.pool.actors[0].pid.remote()) != pid


def _wal_tokens(text: str) -> list[dict]:
    """The token records of a WAL's text (a torn last line left out, as the WAL's reader does)."""
    complete = text[: text.rfind("\n") + 1]
    return [r for r in map(json.loads, complete.splitlines()) if "tok" in r]


def _alive(pid: int) -> bool:
    """The process runs (a zombie, or one already reaped, writes nothing more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_rollout_actor_killed_mid_generation_resumes_from_its_wal(local_ray, tmp_path):
    """SIGKILL in the middle of a call: the call completes with every sample, the restarted actor continues each
    request from its logged tokens (none sampled twice), and the samples equal an uninterrupted run's."""
    model = _model()
    params = SamplingParams(max_new_tokens=40, temperature=1.0)  # 12 x 40 tokens in 2 slots: long enough to catch
    worker = RolloutWorker(model.cfg, 2, 64)
    worker.load_weights(model.state_dict(), 5)
    want = worker.generate(PROMPTS, 3, params, SEEDS)
    total = sum(len(r.completion.token_ids) for r in want)

    rollouts = RayRollouts(1, 2, model.cfg, 2, 64, None, False, tmp_path)
    rollouts.load_weights(model.state_dict(), 5)
    pid = ray.get(rollouts.pool.actors[0].pid.remote())
    wal = tmp_path / "step000001-round0-actor0.wal"
    at_kill: list[str] = []

    def kill_mid_generation():
        while not (wal.exists() and len(_wal_tokens(wal.read_text())) >= 30):
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.001)  # dead (or a zombie): it writes nothing more
        at_kill.append(wal.read_text())

    killer = threading.Thread(target=kill_mid_generation, daemon=True)
    killer.start()
    got = rollouts.generate(PROMPTS, 3, params, SEEDS, wal_key="step000001-round0")
    killer.join(timeout=60)
    assert ray.get(rollouts.pool.actors[0].pid.remote()) != pid  # it did die and come back

    logged = _wal_tokens(at_kill[0])
    assert 30 <= len(logged) < total  # killed in the middle
    for i, r in enumerate(got):
        assert r.completion.resumed == sum(t["tok"] == i for t in logged)  # continued from the log, not resampled
    assert sum(r.completion.resumed for r in got) == len(logged)
    assert [r.completion.token_ids for r in got] == [r.completion.token_ids for r in want]
    for i, (r, w) in enumerate(zip(got, want)):  # the logged part is what the log holds, bit for bit
        assert r.completion.logprobs[: r.completion.resumed] == [t["lp"] for t in logged if t["tok"] == i]
        # against the worker in this process: another process and thread count, so fp32 rounding of other
        # summation orders (tests/unit/test_rollout_wal.py CONTINUATION_LOGPROB_TOL)
        assert r.completion.logprobs == pytest.approx(w.completion.logprobs, abs=1e-5)
    assert not wal.exists()  # the call returned: its log is deleted


def test_a_rollout_actor_without_restarts_left_is_named(local_ray):
    model = _model()
    rollouts = RayRollouts(1, 0, model.cfg, 16, 64, None, False)
    rollouts.load_weights(model.state_dict(), 5)
    os.kill(ray.get(rollouts.pool.actors[0].pid.remote()), signal.SIGKILL)
    with pytest.raises(RuntimeError, match="rollout actor 0 failed"):
        rollouts.generate(PROMPTS, 3, PARAMS, SEEDS)


def _exits(text: str) -> float:
    os._exit(3)  # the reward actor's process dies (not an exception safe_reward could catch)


def test_a_reward_actor_that_keeps_dying_stops_the_run_naming_it(local_ray):
    rewards = RayRewards(1, 1, 1)
    assert rewards.score([(len, "abc")], 5.0) == [(3.0, "reward function returned 3")]
    with pytest.raises(RuntimeError, match=r"reward actor 0 failed .* after 1 restart\(s\)"):
        rewards.score([(_exits, "abc")], 5.0)


def test_a_ray_address_that_does_not_answer_is_refused():
    with pytest.raises(ConfigError, match="127.0.0.1:9 does not answer"):
        with ray_session("127.0.0.1:9", connect_timeout_s=2):
            pass


def _grpo_run(run_dir, overrides, prompts) -> list[dict]:
    cfg, resolved = compose_config("grpo", [f"run.dir={run_dir}", *overrides])
    assert cfg.grpo.ray == ("grpo.ray=false" not in overrides)  # ray=true is the default
    grpo(cfg, resolved, prompts=prompts)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_controller_on_ray_equals_the_controller_in_process(local_ray, tmp_path, base):  # noqa: F811
    """One GRPO step through 2 rollout and 2 reward actors: the same completions, rewards and update as in-process."""
    common = [f"grpo.init={base}", "train.steps=1", *SMALL, *QUIET[1:]]
    local = _grpo_run(tmp_path / "local", ["grpo.ray=false", *common], _prompts(base))
    remote = _grpo_run(tmp_path / "ray", ["grpo.rollout_actors=2", "grpo.reward_actors=2", *common], _prompts(base))
    sample = [json.loads(line) for line in (tmp_path / "local" / "samples.jsonl").read_text().splitlines()]
    sample_ray = [json.loads(line) for line in (tmp_path / "ray" / "samples.jsonl").read_text().splitlines()]
    assert sample == sample_ray
    assert remote[-1]["digits/reward_mean"] == local[-1]["digits/reward_mean"]
    # the same rows through the same Learner: the loss agrees to fp32 rounding of the rollout's logprobs
    assert remote[-1]["loss"] == pytest.approx(local[-1]["loss"], rel=1e-5, abs=1e-7)
    assert torch.isfinite(torch.tensor(remote[-1]["grad_norm"]))
