"""gigatron.data_pipeline: streaming training data, tokens, images and video, resumable per rank.

    text files --prepare.prepare_text--> token shards (P.bin, P.idx.npy, P.json)
               --token_shards.TokenShards (memory maps)--> sampler.PackedBatchStream --> (B, T) batches
    images / videos --prepare_images / prepare_videos--> WebDataset tar shards + DALI .idx (+ MDS, VP9)
               --shard_loader.ShardLoader (lanes = ranks x workers, stream.LaneStream)--> (B, 3, [F,] S, S)

- `loader`: the Loader protocol, batch keys, stats, DataError and the `data.format` registry.
- `config`: the `data:` recipe section (DataConfig, SourceConfig for mixtures).
- `tokenizer`, `token_shards`, `sampler`, `prepare`: the token reader and `gigatron prepare-text`.
- `shards`: lazy shard lists, per-shard sample counts, the per-epoch shard plan of each lane.
- `stream`: one lane's shuffle buffer, exact state and the carry-over of work when the layout changes.
- `tar_reader`, `decode`: tar shards -> samples (truncation-aware) -> validated arrays (no pickle).
- `shard_loader`: the webdataset reader (background worker processes, per-rank state).
- `mds`: the MDS reader and writer (mosaicml-streaming's shard format).
- `dali_loader`: DALI image / VP9 video pipelines (GPU, or CPU with device_id=None).
- `mixture`: weighted mixtures of sources of any format.
- `shard_writer`, `prepare_images`, `prepare_videos`: `gigatron prepare-images` / `prepare-videos`.

Nothing is imported here, so `prepare` (CLI) loads without torch.
"""
