"""The rollout write-ahead log (inference/wal.py) through the generation engine: a generation killed part-way and
started again over the same log returns the completions of a generation that was never interrupted (ids, both
logprobs, routes), samples only the tokens the log does not hold, and logs each token once; what an older policy,
another seed or another prompt logged is not resumed; a torn last line is cut off, a corrupt one refused; the
rollout worker's retried call resumes from its log and deletes it once it returns."""

import json

import pytest
import torch

from dsv4train.inference.engine import Engine
from dsv4train.inference.sampling import SamplingParams
from dsv4train.inference.wal import RolloutWAL, WALError
from dsv4train.posttrain.grpo.rollout import RolloutWorker
from tests.unit.test_engine import build_model

# Around the CSA (4) / window and HCA (8) boundaries; more requests than the 3 slots, so some join late. 45 + 16
# stops at nothing but max_new_tokens.
PROMPTS = [[(7 * i + j) % 290 + 5 for j in range(n)] for i, n in enumerate((5, 30, 13, 1, 20, 9))]
SEEDS = [101, 7, 55, 3000, 12, 9]
PARAMS = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20)
SLOTS = 3
# The resumed continuation is sampled after a prefill over prompt + logged tokens instead of decode steps: its
# logits equal the uninterrupted run's up to fp32 rounding of other matrix shapes (tests/unit/test_engine.py
# BATCH_LOGPROB_TOL, measured there <= 2.7e-6); the logged part is read back bit for bit.
CONTINUATION_LOGPROB_TOL = 1e-5


class Killed(Exception):
    """Stands for the process dying: raised from on_token, which the engine calls after the WAL has the step."""


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def uninterrupted(model):
    return Engine(model, max_batch=SLOTS).generate(PROMPTS, PARAMS, seeds=SEEDS)


def _killed_after(model, path, tokens: int, version: int = 3) -> None:
    """A generation over the WAL at `path` that dies once `tokens` tokens were sampled."""
    seen = []

    def die(index, token):
        seen.append(token)
        if len(seen) == tokens:
            raise Killed

    wal = RolloutWAL(path, version)
    with pytest.raises(Killed):
        Engine(model, max_batch=SLOTS).generate(PROMPTS, PARAMS, seeds=SEEDS, wal=wal, on_token=die)
    wal.close()


def _resumed(model, path, version: int = 3):
    """(completions, [(request, token)] sampled in this call) of a generation that resumes from the WAL at `path`."""
    sampled = []
    wal = RolloutWAL(path, version)
    completions = Engine(model, max_batch=SLOTS).generate(
        PROMPTS, PARAMS, seeds=SEEDS, wal=wal, on_token=lambda i, t: sampled.append((i, t))
    )
    wal.close()
    return completions, sampled


def _token_records(path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "tok" in r]


def _assert_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.finish_reason == w.finish_reason
        for name in ("logprobs", "raw_logprobs"):
            logged, fresh = getattr(g, name)[: g.resumed], getattr(g, name)[g.resumed :]
            assert logged == getattr(w, name)[: g.resumed]  # read back bit for bit
            assert fresh == pytest.approx(getattr(w, name)[g.resumed :], abs=CONTINUATION_LOGPROB_TOL)
        assert g.routes.keys() == w.routes.keys()
        for layer in w.routes:
            assert torch.equal(g.routes[layer], w.routes[layer])


@pytest.mark.parametrize("kill_at", [1, 23, 61])  # after the first token; mid-way; with some requests finished
def test_a_killed_generation_resumes_from_its_log_and_equals_an_uninterrupted_one(
    model, uninterrupted, tmp_path, kill_at
):
    path = tmp_path / "call.wal"
    _killed_after(model, path, kill_at)
    logged = _token_records(path)
    assert len(logged) >= kill_at  # every token sampled before the kill was in the log before on_token saw it
    completions, sampled = _resumed(model, path)
    _assert_same(completions, uninterrupted)
    total = sum(len(c.token_ids) for c in uninterrupted)
    assert sum(c.resumed for c in completions) == len(logged)
    assert len(sampled) == total - len(logged)  # no logged token was sampled again
    records = _token_records(path)  # and each token is logged once, in order
    for i, c in enumerate(uninterrupted):
        assert [r["n"] for r in records if r["tok"] == i] == list(range(len(c.token_ids)))
        assert [r["id"] for r in records if r["tok"] == i] == c.token_ids


def test_a_finished_call_resumed_samples_nothing(model, uninterrupted, tmp_path):
    """The actor died after the last token but before its answer reached the caller."""
    path = tmp_path / "call.wal"
    wal = RolloutWAL(path, 3)
    Engine(model, max_batch=SLOTS).generate(PROMPTS, PARAMS, seeds=SEEDS, wal=wal)
    wal.close()
    completions, sampled = _resumed(model, path)
    assert sampled == []
    _assert_same(completions, uninterrupted)


def test_a_torn_last_line_is_cut_off_and_its_token_sampled_again(model, uninterrupted, tmp_path):
    path = tmp_path / "call.wal"
    _killed_after(model, path, 30)
    whole = path.read_bytes()
    path.write_bytes(whole[:-9])  # the kill landed in the middle of the last write
    last = json.loads(whole.splitlines()[-1])
    completions, sampled = _resumed(model, path)
    _assert_same(completions, uninterrupted)
    assert (last["tok"], last["id"]) in sampled
    assert path.read_bytes().startswith(whole[: whole.rstrip(b"\n").rfind(b"\n") + 1])
    RolloutWAL(path, 3).close()  # the torn bytes are gone: what was appended after them reads back


@pytest.mark.parametrize("change", ["version", "seed", "prompt"])
def test_what_another_policy_seed_or_prompt_logged_is_not_resumed(model, tmp_path, change):
    path = tmp_path / "call.wal"
    _killed_after(model, path, 40)
    logged_requests = {r["tok"] for r in _token_records(path)}
    version = 4 if change == "version" else 3
    seeds = [s + 1 for s in SEEDS] if change == "seed" else SEEDS
    prompts = [p + [9] for p in PROMPTS] if change == "prompt" else PROMPTS
    wal = RolloutWAL(path, version)
    assert logged_requests and all(wal.resume(i, prompts[i], seeds[i]) is None for i in logged_requests)
    completions = Engine(model, max_batch=SLOTS).generate(prompts, PARAMS, seeds=seeds, wal=wal)
    wal.close()
    assert all(c.resumed == 0 for c in completions)
    reread = RolloutWAL(path, version)  # the fresh requests' lines supersede the old ones
    assert all(reread.resume(i, prompts[i], seeds[i]).token_ids == c.token_ids for i, c in enumerate(completions))
    reread.close()


def test_a_corrupt_line_is_refused_naming_the_file_and_line(model, tmp_path):
    path = tmp_path / "call.wal"
    _killed_after(model, path, 20)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = '{"tok": 0, "n": 7}\n'
    path.write_text("".join(lines))
    with pytest.raises(WALError, match=r"call\.wal:3: not a rollout WAL record"):
        RolloutWAL(path, 3)


def test_a_token_out_of_order_is_refused(model, tmp_path):
    path = tmp_path / "call.wal"
    _killed_after(model, path, 20)
    records = path.read_text().splitlines()
    first = next(i for i, line in enumerate(records) if '"tok"' in line)
    del records[first]
    path.write_text("\n".join(records) + "\n")
    with pytest.raises(WALError, match=r"token 1 of request \d+ after 0 logged tokens"):
        RolloutWAL(path, 3)


def test_the_rollout_workers_retried_call_resumes_from_its_log_and_deletes_it(model, tmp_path):
    group = 2
    prompts, seeds = PROMPTS[:3], SEEDS[:6]
    worker = RolloutWorker(model.cfg, SLOTS, model.cfg.max_seq_len, wal_dir=tmp_path)
    worker.load_weights(model.state_dict(), 3)
    want = worker.generate(prompts, group, PARAMS, seeds, wal_key="step000001-round0")
    assert list(tmp_path.iterdir()) == []  # returned: the log is gone

    expanded = [p for p in prompts for _ in range(group)]
    wal = RolloutWAL(tmp_path / "step000001-round0.wal", 3)  # the first life of the call, killed after 25 tokens
    seen = []

    def die(index, token):
        seen.append(token)
        if len(seen) == 25:
            raise Killed

    with pytest.raises(Killed):
        Engine(model, max_batch=SLOTS).generate(expanded, PARAMS, seeds=seeds, wal=wal, on_token=die)
    wal.close()
    got = worker.generate(prompts, group, PARAMS, seeds, wal_key="step000001-round0")
    assert sum(r.completion.resumed for r in got) >= 25
    assert [r.completion.token_ids for r in got] == [r.completion.token_ids for r in want]
    assert [r.group for r in got] == [r.group for r in want]
    assert list(tmp_path.iterdir()) == []
