"""`dsv4 data tasks` (data/tasks/records.py): every sample once per mode, and the test problems `dsv4 eval` asks are
exactly those of the written test.jsonl, at the same math difficulty."""

import json

from dsv4train.data.tasks import math
from dsv4train.data.tasks.records import write_task_records
from dsv4train.posttrain.evaluation import task_problems


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_sample_is_written_in_both_modes(tmp_path):
    counts = write_task_records(tmp_path, ["math", "code"], n_train=6, n_test=3, seed=0)
    assert counts == {"train.jsonl": 2 * (6 + 6), "test.jsonl": 2 * (3 + 3)}
    train = _read(tmp_path / "train.jsonl")
    assert [(r["domain"], r["mode"]) for r in train[:4]] == [("math", "think"), ("math", "chat")] * 2
    assert train[0]["messages"][0] == train[1]["messages"][0]  # one sample, two modes
    assert "reasoning_content" in train[0]["messages"][1] and "reasoning_content" not in train[1]["messages"][1]


def test_eval_asks_the_written_test_problems_at_the_same_difficulty(tmp_path):
    for difficulty in (1, 3):
        write_task_records(tmp_path, ["math"], n_train=1, n_test=5, seed=7, math_difficulty=difficulty)
        written = [r["messages"][0]["content"] for r in _read(tmp_path / "test.jsonl") if r["mode"] == "chat"]
        asked = [p.user_text for p in task_problems("math", "test", 5, 7, "chat", math_difficulty=difficulty)]
        assert asked == written
    easy = {s.prompt for s in math.make_split("test", 5, 7, difficulty=1)}
    assert not easy & {s.prompt for s in math.make_split("test", 5, 7, difficulty=3)}
