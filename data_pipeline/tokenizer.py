"""Tokenizers: Meta's Llama 3 BPE (128,256 ids) and a byte-level tokenizer for tests and tiny models.

Both expose one small interface (`Tokenizer`): `name`, `vocab_size`, `bos_id`, `eos_id`, `encode`,
`encode_batch`, `decode`, and `path` (the vocabulary file, or None). `build_tokenizer(name)` is the
only constructor the rest of gigatron calls, so a config field `tokenizer: llama3` is all a run names.

Llama 3 is rebuilt here from Meta's own `tokenizer.model` (shipped by the `llama-models` package:
128,000 base64 BPE ranks) with `tiktoken`, exactly as Meta's `llama_models/llama3/tokenizer.py` does:
the same pre-tokenizer regex, the same 256 special tokens at ids 128000..128255, and the same input
splitting. The splitting matters: tiktoken's Rust regex overflows its stack (a panic, not an
exception) on very long runs of whitespace or non-whitespace, so Meta cuts the text every 400,000
characters and cuts runs longer than 25,000 characters; we do the same cuts, so our ids equal
Meta's on every input (a test checks this against `llama_models` itself). Unlike Meta's per-character
Python loop, the run check is vectorised with numpy (~60 MB/s on one core), so ordinary text
pays little for the guard.

Special tokens are never parsed out of text: "<|eot_id|>" inside a source file is encoded as the
plain characters it is. Only `bos=True` / `eos=True` add BOS/EOS ids; data cannot inject control ids.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
from typing import Protocol, Sequence

import numpy as np

__all__ = ["Tokenizer", "Llama3Tokenizer", "ByteTokenizer", "build_tokenizer", "TOKENIZERS"]


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    bos_id: int
    eos_id: int
    path: str | None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


# Meta's constants (llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL_TOKENS))]
TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # longer inputs are cut into pieces of this many characters
MAX_RUN_CHARS = 25_000  # longer runs of (non-)whitespace are cut every this many characters

# Whitespace as str.isspace (and regex `\s`) defines it: every such code point is <= U+3000.
_IS_SPACE = np.array([chr(c).isspace() for c in range(0x3001)] + [False])  # index 0x3001 = "above"
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1}}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1}}}")
_RUN = re.compile(r"\S+|\s+")


def _longest_run(text: str) -> int:
    """Length of the longest run of only-whitespace or only-non-whitespace characters (vectorised)."""
    codepoints = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    is_space = _IS_SPACE[np.minimum(codepoints, 0x3001)]
    changes = np.flatnonzero(is_space[1:] != is_space[:-1])  # run i ends at changes[i]
    return int(np.diff(np.concatenate(([-1], changes, [len(codepoints) - 1]))).max())


def _split_for_tiktoken(text: str) -> list[str]:
    """Cut `text` where Meta's tokenizer cuts it (400K-character pieces, 25K-character runs).

    Equivalent to Meta's `_split_whitespaces_or_nonwhitespaces` applied to each 400K piece: a run
    of one class (str.isspace) is cut at offsets 25000, 50000, ... from the run's start. Ordinary
    text takes the vectorised check only and comes back as `[text]`.
    """
    pieces = []
    for begin in range(0, max(len(text), 1), TIKTOKEN_MAX_ENCODE_CHARS):
        piece = text[begin : begin + TIKTOKEN_MAX_ENCODE_CHARS]
        if len(piece) <= MAX_RUN_CHARS or _longest_run(piece) <= MAX_RUN_CHARS:
            pieces.append(piece)
            continue
        # Rare: find each long run from its first character (the look-behind fails at once inside
        # a run, so this stays linear) and cut it every MAX_RUN_CHARS characters.
        cuts, pos = [], 0
        while (long_run := _LONG_RUN.search(piece, pos)) is not None:
            run_end = _RUN.match(piece, long_run.start()).end()
            cuts.extend(range(long_run.start() + MAX_RUN_CHARS, run_end, MAX_RUN_CHARS))
            pos = run_end
        bounds = [0, *cuts, len(piece)]
        pieces.extend(piece[a:b] for a, b in zip(bounds, bounds[1:]))
    return pieces


def llama3_tokenizer_path() -> str:
    """Path of Meta's Llama 3 `tokenizer.model`, from the installed `llama-models` package."""
    try:
        path = importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"
    except ModuleNotFoundError as error:
        raise FileNotFoundError(
            "the Llama 3 tokenizer needs Meta's tokenizer.model: pip install --no-deps llama-models"
        ) from error
    if not path.is_file():
        raise FileNotFoundError(f"Llama 3 tokenizer.model not found at {path}")
    return str(path)


@functools.lru_cache(maxsize=4)
def _load_llama3_encoding(path: str):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(path)  # {token bytes: rank}, 128,000 entries
    special = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)


class Llama3Tokenizer:
    """Meta's Llama 3 tokenizer: byte-level BPE, 128,000 ranks + 256 special tokens = 128,256 ids."""

    name = "llama3"

    def __init__(self, path: str | None = None, num_threads: int | None = None):
        self.path = str(path) if path is not None else llama3_tokenizer_path()
        self.encoding = _load_llama3_encoding(self.path)
        self.special_tokens = {token: self.encoding.encode_single_token(token) for token in LLAMA3_SPECIAL_TOKENS}
        self.vocab_size = self.encoding.n_vocab  # 128256
        self.bos_id = self.special_tokens["<|begin_of_text|>"]  # 128000
        self.eos_id = self.special_tokens["<|end_of_text|>"]  # 128001
        self.eot_id = self.special_tokens["<|eot_id|>"]  # 128009
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]  # 128004
        self.num_threads = num_threads or os.cpu_count() or 1

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [i for piece in _split_for_tiktoken(text) for i in self.encoding.encode_ordinary(piece)]
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode many texts on `num_threads` threads (tiktoken's Rust core releases the GIL)."""
        pieces, owners = [], []
        for index, text in enumerate(texts):
            for piece in _split_for_tiktoken(text):
                pieces.append(piece)
                owners.append(index)
        encoded = self.encoding.encode_ordinary_batch(pieces, num_threads=self.num_threads)
        out: list[list[int]] = [[] for _ in texts]
        for index, ids in zip(owners, encoded):
            out[index].extend(ids)
        return [self._wrap(ids, bos, eos) for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, BOS = 256, EOS = 257: no vocabulary file, vocab_size 258."""

    name = "bytes"
    vocab_size = 258
    bos_id = 256
    eos_id = 257
    path = None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8", errors="replace"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(text, bos, eos) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Specials (BOS/EOS) decode to nothing; broken UTF-8 decodes to U+FFFD, as tiktoken does."""
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


TOKENIZERS = {"llama3": Llama3Tokenizer, "bytes": ByteTokenizer}


def build_tokenizer(name: str) -> Tokenizer:
    """Build a tokenizer by name: "llama3" (Meta's 128,256-id BPE) or "bytes" (258 ids)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(sorted(TOKENIZERS))}")
    return TOKENIZERS[name]()
