"""prepare_text: directories, files, the Python standard library, and the CLI."""

import os

import numpy as np
import pytest

from gigatron.data_pipeline.prepare import list_source_files, main, prepare_text, stdlib_source_dir
from gigatron.data_pipeline.token_shards import TokenShards
from gigatron.data_pipeline.tokenizer import Llama3Tokenizer


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    files = {
        "b.txt": "second file\r\nkeeps CRLF",
        "a.py": "print('héllo')\n",
        "sub/c.md": "# title <|eot_id|>\n",
        "sub/__pycache__/x.py": "skipped",
        "data.bin": "not matched by the patterns",
        "empty.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    return root


def test_directory_with_byte_tokenizer(corpus, tmp_path):
    meta = prepare_text([str(corpus)], str(tmp_path / "out" / "data"), tokenizer_name="bytes", progress=False)
    texts = ["print('héllo')\n", "second file\r\nkeeps CRLF", "# title <|eot_id|>\n"]  # sorted: a.py, b.txt, sub/c.md
    assert meta["num_documents"] == meta["sources"] == 3
    assert meta["bytes"] == sum(len(t.encode()) for t in texts)
    shards = TokenShards(tmp_path / "out" / "data")
    for i, text in enumerate(texts):
        assert shards.document(i).tolist() == [256, *text.encode("utf-8"), 257]
    # Deterministic: the same inputs give the same bytes.
    prepare_text([str(corpus)], str(tmp_path / "again"), tokenizer_name="bytes", progress=False)
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "out" / "data.bin").read_bytes()


def test_sources_resolution(corpus):
    files = list_source_files([str(corpus / "b.txt"), str(corpus)])
    assert [os.path.relpath(f, corpus) for f in files] == ["b.txt", "a.py", "empty.py", os.path.join("sub", "c.md")]
    with pytest.raises(FileNotFoundError, match="neither"):
        list_source_files([str(corpus / "missing")])


def test_stdlib_with_llama3(tmp_path):
    meta = prepare_text(["stdlib"], str(tmp_path / "stdlib"), tokenizer_name="llama3", max_bytes=200_000, progress=False)
    files = [f for f in list_source_files(["stdlib"]) if os.path.getsize(f)]
    assert not any("site-packages" in f for f in files) and all(f.startswith(stdlib_source_dir()) for f in files)
    assert 200_000 <= meta["bytes"] < 200_000 + max(os.path.getsize(f) for f in files[: meta["sources"]])
    assert 2.5 < meta["bytes"] / meta["num_tokens"] < 5  # Llama 3 BPE on Python source: ~3.7 bytes/token
    shards = TokenShards(tmp_path / "stdlib")
    tokenizer = Llama3Tokenizer()
    first = shards.document(0)
    assert first[0] == tokenizer.bos_id and first[-1] == tokenizer.eos_id
    with open(files[0], "rb") as f:
        assert tokenizer.decode(first[1:-1].tolist()) == f.read().decode("utf-8", errors="replace")
    assert int(np.max(shards.tokens)) < tokenizer.vocab_size


def test_cli(corpus, tmp_path, capsys):
    assert main([str(corpus), "--out", str(tmp_path / "cli"), "--tokenizer", "bytes", "--max-mb", "0.00001", "--no-progress"]) == 0
    assert "1 files" in capsys.readouterr().out  # 10 bytes: stops after the first file
    assert TokenShards(tmp_path / "cli").num_documents == 1
    with pytest.raises(SystemExit):
        main([str(corpus), "--out", str(tmp_path / "x"), "--tokenizer", "gpt2"])
