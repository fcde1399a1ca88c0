"""Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json) for Llama 3, built offline
from Meta's tokenizer.model with transformers' TikTokenConverter.

The converter turns the 128,000 BPE ranks into a byte-level BPE with merges; the 256 special tokens
(ids 128000..128255, gigatron.data_pipeline.tokenizer.LLAMA3_SPECIAL_TOKENS) are added explicitly,
in id order (its own special-token argument did not add them in transformers 5.24). As in Meta's
published files, encoding prepends <|begin_of_text|> unless add_special_tokens=False.
"""

from __future__ import annotations


def write_llama3_tokenizer(out: str, model_path: str | None = None) -> None:
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gigatron.data_pipeline.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, llama3_tokenizer_path

    tok = TikTokenConverter(vocab_file=model_path or llama3_tokenizer_path(), pattern=LLAMA3_PATTERN).converted()
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA3_SPECIAL_TOKENS])
    for i, t in enumerate(LLAMA3_SPECIAL_TOKENS):
        if tok.token_to_id(t) != base + i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {base + i}")
    bos, eos = LLAMA3_SPECIAL_TOKENS[0], LLAMA3_SPECIAL_TOKENS[1]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, base)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   model_max_length=131072, clean_up_tokenization_spaces=True)
    fast.save_pretrained(out)
