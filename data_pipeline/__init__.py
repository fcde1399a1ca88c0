"""gigatron.data_pipeline: real token data for pretraining.

    text files --prepare.prepare_text--> token shards (P.bin, P.idx.npy, P.json)
               --token_shards.TokenShards (memory maps)--> sampler.PackedBatchStream --> (B, T) batches

- `tokenizer`: Meta's Llama 3 BPE (128,256 ids) and a 258-id byte tokenizer; `build_tokenizer(name)`.
- `token_shards`: the on-disk format; a streaming, atomic writer and a memory-mapped reader.
- `sampler`: packed windows in a seeded per-epoch permutation, sharded over DP ranks by global
  sample count: streaming, deterministic, O(1) memory, resumable under a different dp_size.
- `prepare`: files / directories / the Python stdlib -> token shards; CLI `gigatron prepare-text`.

Nothing is imported here, so `prepare` (CLI) loads without torch.
"""
