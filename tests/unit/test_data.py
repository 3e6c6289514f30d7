"""`dsv4 data prepare` and the packed loader: round trip through megatron's format, determinism and exact
resume, blend proportions, a fixed disjoint validation split, and refusals that name the file."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4train.cli.data import data_main
from dsv4train.config.data import DataConfig
from dsv4train.config.errors import ConfigError
from dsv4train.data.indexed import open_documents
from dsv4train.data.loader import PackedLoader, check_vocab
from dsv4train.data.prepare import input_files

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
LINES = [f"line {i}: " + "abc " * (5 + i % 7) + "é✓" * (i % 3) for i in range(60)]
# megatron's IndexedDataset.__del__ fails after its own __init__ failed; our error is the one raised
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _prepare(*args) -> int:
    return data_main(["prepare", *map(str, args)])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "mix"
    assert _prepare("--input", SAMPLE, "--vocab-size", 300, "--name", "prose", "--out", out) == 0
    jsonl = out.parent / "more.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in LINES) + "\n")
    assert _prepare("--input", jsonl, "--name", "lines", "--append", "--out", out) == 0
    return out


def _loader(folder, split="train", seq_len=16, batch_size=3, **kw):
    return PackedLoader(DataConfig(dir=str(folder), **kw), seq_len=seq_len, batch_size=batch_size, split=split)


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("tokens", "doc_start"))


def test_manifest_counts_and_round_trip(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert (manifest["vocab_size"], manifest["bos_id"], manifest["eos_id"]) == (300, 0, 1)
    assert list(manifest["datasets"]) == ["prose", "lines"]
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    sample_texts = [f.read_text() for f in input_files([SAMPLE])]
    for name, texts in (("prose", sample_texts), ("lines", LINES)):
        docs = open_documents(prepared / name)
        entry = manifest["datasets"][name]
        assert entry["documents"] == len(docs) == len(texts)
        assert entry["tokens"] == int(docs.sequence_lengths.sum())
        assert all(docs[i][-1] == 1 and 1 not in docs[i][:-1] for i in range(len(docs)))  # EOS ends each, once
        assert [tok.decode(docs[i][:-1].tolist(), skip_special_tokens=False) for i in range(len(docs))] == texts


def test_loader_is_deterministic_and_resumes_exactly(prepared):
    a = _loader(prepared)
    first = [a.next_batch() for _ in range(5)]
    state = a.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain data, goes into a checkpoint as is
    rest = [a.next_batch() for _ in range(40)]  # several epochs of `lines`
    fresh = _loader(prepared)
    assert _same(first, [fresh.next_batch() for _ in range(5)])
    resumed = _loader(prepared)
    resumed.load_state_dict(state)
    assert _same(rest, [resumed.next_batch() for _ in range(40)])
    assert not torch.equal(_loader(prepared, seed=7).next_batch()["tokens"], first[0]["tokens"])
    assert a.vocab_size == 300 and first[0]["tokens"].dtype == torch.long and first[0]["tokens"].shape == (3, 17)
    with pytest.raises(ConfigError, match="data.sources"):
        _loader(prepared, sources=["lines"]).load_state_dict(state)


def test_rows_overlap_by_one_token_and_mark_document_starts(prepared):
    loader = _loader(prepared, sources=["lines"])
    batches = [loader.next_batch() for _ in range(12)]
    tokens = torch.cat([b["tokens"] for b in batches])
    starts = torch.cat([b["doc_start"] for b in batches])
    assert torch.equal(tokens[1:, 0], tokens[:-1, -1]) and torch.equal(starts[1:, 0], starts[:-1, -1])
    assert starts[0, 0]  # the stream starts with a document
    assert torch.equal(starts[:, 1:], tokens[:, :-1] == 1)  # a document starts right after each EOS
    assert starts.sum() > 10


def test_blend_weights_are_respected(prepared):
    loader = _loader(prepared, weights=[1.0, 3.0], sources=["prose", "lines"])
    for _ in range(40):
        loader.next_batch()
    rows = [s.cursor.rows for s in loader.sources]
    assert rows == [30, 90]
    by_tokens = _loader(prepared)  # no weights: proportional to each dataset's tokens
    manifest = json.loads((prepared / "manifest.json").read_text())
    share = manifest["datasets"]["prose"]["tokens"] / sum(d["tokens"] for d in manifest["datasets"].values())
    for _ in range(40):
        by_tokens.next_batch()
    assert abs(by_tokens.sources[0].cursor.rows / 120 - share) < 0.02


def test_validation_split_is_fixed_and_disjoint(prepared):
    train, val = _loader(prepared, val_fraction=0.1), _loader(prepared, "val", val_fraction=0.1)
    for t, v in zip(train.sources, val.sources):
        assert not set(t.doc_ids) & set(v.doc_ids) and len(set(t.doc_ids) | set(v.doc_ids)) == len(t.docs)
    assert len(val.sources[1].doc_ids) == 6  # 10% of 60
    other = _loader(prepared, "val", val_fraction=0.1, seed=99, sources=["lines"])  # another seed and mix
    assert list(other.sources[0].doc_ids) == list(val.sources[1].doc_ids)
    val.next_batch()
    assert _same(val.val_batches(3), val.val_batches(3)) and val.rows == 3  # fixed; the cursor is left alone
    assert _same(val.val_batches(2), _loader(prepared, "val", val_fraction=0.1).val_batches(2))


def test_given_tokenizer_and_append_with_another_is_refused(prepared, tmp_path, capsys):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t}) for t in LINES[:20]))
    assert _prepare("--input", jsonl, "--text-key", "body", "--tokenizer", prepared, "--out", tmp_path / "same") == 0
    assert (tmp_path / "same" / "tokenizer.json").read_bytes() == (prepared / "tokenizer.json").read_bytes()
    hf = tmp_path / "hf"  # a Hugging Face tokenizer folder whose EOS is named in tokenizer_config.json
    hf.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(
        LINES,
        trainers.BpeTrainer(
            vocab_size=280,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    assert _prepare("--input", jsonl, "--text-key", "body", "--tokenizer", hf, "--out", tmp_path / "hf_out") == 0
    manifest = json.loads((tmp_path / "hf_out" / "manifest.json").read_text())
    assert (manifest["bos_id"], manifest["eos_id"]) == (1, 2) and manifest["vocab_size"] == tok.get_vocab_size()
    assert all(d[-1] == 2 for d in open_documents(tmp_path / "hf_out" / "main"))
    given_file = ["--input", jsonl, "--text-key", "body", "--tokenizer", hf / "tokenizer.json"]
    assert _prepare(*given_file, "--out", tmp_path / "by_file") == 0
    (hf / "tokenizer_config.json").unlink()  # now nothing says which token ends a document
    assert _prepare(*given_file, "--out", tmp_path / "no_eos") == 2
    assert "end-of-document" in capsys.readouterr().err and not (tmp_path / "no_eos").exists()
    before = {p.name: p.read_bytes() for p in prepared.iterdir()}
    assert (
        _prepare(
            "--input", jsonl, "--text-key", "body", "--tokenizer", hf, "--name", "x", "--append", "--out", prepared
        )
        == 2
    )
    assert "differs" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before


def test_parquet_input_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": LINES[:12], "id": list(range(12))}), tmp_path / "t.parquet")
    out = tmp_path / "pq"
    assert _prepare("--input", tmp_path / "t.parquet", "--text-key", "content", "--vocab-size", 280, "--out", out) == 0
    tok, docs = Tokenizer.from_file(str(out / "tokenizer.json")), open_documents(out / "main")
    assert [tok.decode(docs[i][:-1].tolist()) for i in range(len(docs))] == LINES[:12]


def test_refusals_name_the_problem(prepared, tmp_path, capsys):
    before = (prepared / "manifest.json").read_text()
    assert _prepare("--input", SAMPLE, "--out", prepared) == 2
    assert "not empty" in capsys.readouterr().err and (prepared / "manifest.json").read_text() == before
    assert _prepare("--input", SAMPLE, tmp_path / "nope.txt", "--out", tmp_path / "o") == 2
    assert "nope.txt" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert _prepare("--input", SAMPLE, "--name", "lines", "--append", "--out", prepared) == 2
    assert "already exists" in capsys.readouterr().err and (prepared / "manifest.json").read_text() == before
    with pytest.raises(ConfigError, match="data.sources"):
        _loader(prepared, sources=["missing"])
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        _loader(tmp_path)
    with pytest.raises(ConfigError, match="model.vocab_size"):
        check_vocab(300, 256)
    check_vocab(300, 300)


def test_a_failed_write_leaves_the_folder_as_it_was(prepared, tmp_path, monkeypatch):
    import dsv4train.data.prepare as prepare_module

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_documents", broken)
    folder = tmp_path / "copy"
    shutil.copytree(prepared, folder)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(KeyboardInterrupt):
        _prepare("--input", SAMPLE, "--name", "more", "--append", "--out", folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    with pytest.raises(KeyboardInterrupt):
        _prepare("--input", SAMPLE, "--vocab-size", 265, "--out", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_truncated_or_corrupt_files_are_named(prepared, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(prepared, broken)
    idx = broken / "lines.idx"
    idx.write_bytes(idx.read_bytes()[:40])
    with pytest.raises(ConfigError, match="lines.idx"):
        _loader(broken, sources=["lines"])
    idx.write_bytes(b"garbage" * 10)
    with pytest.raises(ConfigError, match="lines.idx"):
        _loader(broken, sources=["lines"])
    idx.unlink()
    with pytest.raises(FileNotFoundError, match="lines.idx"):
        _loader(broken, sources=["lines"])
    bin_path = broken / "prose.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="prose.bin"):
        _loader(broken, sources=["prose"])


def test_data_config_errors_name_the_field():
    for kwargs, key in (
        ({"sources": ["a"], "weights": [1.0, 2.0]}, "data.weights"),
        ({"sources": ["a"], "weights": [0.0]}, "data.weights"),
        ({"sources": ["a", "a"]}, "data.sources"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"seed": -1}, "data.seed"),
        ({"dir": ""}, "data.dir"),
    ):
        with pytest.raises(ConfigError, match=key):
            DataConfig(**kwargs)
    assert DataConfig(sources=["a", "b"], weights=[1, 3]).weights == [1.0, 3.0]
