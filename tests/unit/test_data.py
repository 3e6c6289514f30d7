"""`dsv4 data prepare` and the packed loader: round trip through megatron's format, determinism and exact
resume, blend proportions, a disjoint validation split, and refusals that name the file."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv4train.cli.data import data_main
from dsv4train.config.data import DataConfig
from dsv4train.config.errors import ConfigError
from dsv4train.data.indexed import open_documents
from dsv4train.data.loader import PackedLoader, check_vocab

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "mix"
    assert data_main(["prepare", "--input", str(SAMPLE), "--vocab-size", "300", "--name", "prose", "--out", str(out)]) == 0
    jsonl = out.parent / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i}: " + "abc " * (5 + i % 7)}) for i in range(60)))
    assert data_main(["prepare", "--input", str(jsonl), "--name", "lines", "--append", "--out", str(out)]) == 0
    return out


def _loader(prepared, split="train", **kw):
    return PackedLoader(DataConfig(dir=str(prepared), **kw), seq_len=16, batch_size=3, split=split)


def test_manifest_and_round_trip(prepared):
    from tokenizers import Tokenizer

    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["vocab_size"] == 300 and set(manifest["datasets"]) == {"prose", "lines"}
    assert manifest["datasets"]["lines"]["documents"] == 60
    docs = open_documents(prepared / "prose")
    assert len(docs) == manifest["datasets"]["prose"]["documents"]
    assert int(docs.sequence_lengths.sum()) == manifest["datasets"]["prose"]["tokens"]
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    texts = {tok.decode(docs[i][:-1].tolist()) for i in range(len(docs))}
    assert (SAMPLE / "rivers.txt").read_text() in texts
    assert all(docs[i][-1] == manifest["eos_id"] for i in range(len(docs)))


def test_loader_is_deterministic_and_resumes_exactly(prepared):
    a = _loader(prepared)
    first = [a.next_batch() for _ in range(5)]
    state = a.state_dict()
    json.dumps(state)  # plain data, goes into a checkpoint as is
    rest = [a.next_batch() for _ in range(7)]
    b = _loader(prepared)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(first, [b.next_batch() for _ in range(5)]))
    c = _loader(prepared)
    c.load_state_dict(state)
    again = [c.next_batch() for _ in range(7)]
    assert all(torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["doc_start"], y["doc_start"])
               for x, y in zip(rest, again))
    other_seed = PackedLoader(DataConfig(dir=str(prepared), seed=7), 16, 3, "train").next_batch()
    assert not torch.equal(other_seed["tokens"], first[0]["tokens"])


def test_rows_overlap_by_one_token_and_mark_document_starts(prepared):
    loader = _loader(prepared, sources=["lines"])
    b = loader.next_batch()["tokens"]
    assert torch.equal(b[0, -1], b[1, 0]) and torch.equal(b[1, -1], b[2, 0])
    starts = loader.next_batch()["doc_start"]
    assert starts.any()  # documents here are ~10-30 tokens, rows 17


def test_blend_weights_are_respected(prepared):
    loader = _loader(prepared, sources=["prose", "lines"], weights=[1.0, 3.0])
    for _ in range(40):
        loader.next_batch()
    rows = [s.cursor.rows for s in loader.sources]
    assert rows[0] + rows[1] == 120 and abs(rows[1] / 120 - 0.75) < 0.02


def test_validation_split_is_disjoint_and_fixed(prepared):
    train, val = _loader(prepared, sources=["lines"]), _loader(prepared, "val", sources=["lines"])
    assert not set(train.sources[0].doc_ids) & set(val.sources[0].doc_ids)
    assert len(val.sources[0].doc_ids) == 3  # 5% of 60
    v1, v2 = val.val_batches(2), val.val_batches(2)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(v1, v2))


def test_refusals_name_the_problem(prepared, tmp_path, capsys):
    before = (prepared / "manifest.json").read_text()
    assert data_main(["prepare", "--input", str(SAMPLE), "--out", str(prepared)]) == 2
    assert "not empty" in capsys.readouterr().err and (prepared / "manifest.json").read_text() == before
    assert data_main(["prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.txt" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="data.sources"):
        _loader(prepared, sources=["missing"])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        _loader(tmp_path)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        check_vocab(300, 256)
    check_vocab(300, 4096)


def test_truncated_or_corrupt_files_are_named(prepared, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    bin_path = broken / "prose.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="prose.bin"):
        _loader(broken, sources=["prose"])
    (broken / "lines.idx").write_bytes(b"garbage" * 10)
    with pytest.raises(ConfigError, match="lines.idx"):
        _loader(broken, sources=["lines"])
    (broken / "lines.idx").unlink()
    with pytest.raises(FileNotFoundError, match="lines.idx"):
        _loader(broken, sources=["lines"])


def test_data_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.weights"):
        DataConfig(sources=["a"], weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="data.val_fraction"):
        DataConfig(val_fraction=0.0)
    assert np.isclose(DataConfig(sources=["a", "b"], weights=[1, 3]).weights[1], 3)
