"""Tokenizers: Llama 3 ids and round trips (checked against Meta's own implementation), bytes, registry."""

import pydoc_data.topics
import pytest

from gigatron.data_pipeline.tokenizer import ByteTokenizer, Llama3Tokenizer, build_tokenizer

TOPICS = "".join(pydoc_data.topics.topics.values())  # ~0.5 MB of real English (Python's reference docs)


@pytest.fixture(scope="module")
def llama3():
    return Llama3Tokenizer()


def test_llama3_ids_and_vocab(llama3):
    assert llama3.vocab_size == 128256
    assert (llama3.bos_id, llama3.eos_id, llama3.eot_id) == (128000, 128001, 128009)
    assert llama3.special_tokens["<|eot_id|>"] == 128009
    assert llama3.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert len(llama3.special_tokens) == 256
    assert llama3.path.endswith("tokenizer.model")


def test_llama3_round_trip_real_text(llama3):
    text = TOPICS[:100_000]
    ids = llama3.encode(text, bos=True, eos=True)
    assert ids[0] == llama3.bos_id and ids[-1] == llama3.eos_id
    assert 3 < len(text) / len(ids) < 6  # BPE on English: ~4 characters per token
    assert llama3.decode(ids[1:-1]) == text
    assert llama3.encode_batch([text, "", "héllo wörld 🙂"]) == [llama3.encode(t) for t in (text, "", "héllo wörld 🙂")]


def test_llama3_specials_in_text_are_plain_text(llama3):
    ids = llama3.encode("a<|eot_id|>b<|begin_of_text|>")
    assert not {128000, 128001, 128009} & set(ids)
    assert llama3.decode(ids) == "a<|eot_id|>b<|begin_of_text|>"
    assert llama3.decode([128009]) == "<|eot_id|>"


def test_llama3_matches_meta_reference(llama3):
    """Same ids as Meta's llama_models tokenizer, including the inputs it has to cut up for tiktoken."""
    from llama_models.llama3.tokenizer import Tokenizer  # Meta's own implementation

    reference = Tokenizer.get_instance()
    cases = [
        TOPICS[:50_000],
        "def f(x):\n\treturn x  # ok\r\n",
        "x" * 60_000 + " " * 50_000 + "y" * 25_001,  # long runs: Meta cuts them every 25,000 characters
        " " * 30_000 + "\n" + "中" * 26_000 + "\u3000" * 26_000,
        "é" * 450_000,  # longer than one 400,000-character piece
    ]
    for text in cases:
        ours = llama3.encode(text, bos=True, eos=True)
        assert ours == reference.encode(text, bos=True, eos=True)
        assert llama3.decode(ours[1:-1]) == text


def test_llama3_long_whitespace_does_not_crash(llama3):
    """Plain tiktoken panics (Rust stack overflow) on 1M spaces; the Meta-style cut avoids it."""
    text = " " * 1_000_000
    assert llama3.decode(llama3.encode(text)) == text


def test_byte_tokenizer():
    tokenizer = ByteTokenizer()
    text = "héllo\n🙂"
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids == [256, *text.encode("utf-8"), 257]
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 258 and max(ids) < tokenizer.vocab_size
    assert tokenizer.encode_batch(["a", "b"], eos=True) == [[97, 257], [98, 257]]


def test_build_tokenizer():
    assert isinstance(build_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(build_tokenizer("llama3"), Llama3Tokenizer)
    with pytest.raises(ValueError, match="bytes, llama3"):
        build_tokenizer("gpt2")
