"""Image-text sources, the grain input pipeline, pre-encoding and the synthetic shapes set.

- `pipeline`: `make_iterator(config, batch_size=..., seed=...)` -> `DataIterator`, and the
  trainers' views `image_batches` / `pre_encoded_batches`; `config`: `default_data_config()`.
- `sources`, `folder`, `tar_shards`: random-access sources (folder, WebDataset tar shards,
  TFDS array_record, pre-encoded shards, shapes) and `make_source` (this host's part).
- `transforms`: decoding, RGB conversion, crop, and the reasons bad data is skipped or converted;
  `batching`: batches of good examples that carry the counts of the bad ones.
- `preencode`, `records`: pre-encoded ArrayRecord shards and their record format.
- `shapes`, `judge`: the synthetic set and the pixel judge of its captions.
"""
