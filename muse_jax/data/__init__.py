"""Image-text sources, the grain input pipeline, pre-encoding and the synthetic shapes set.

- `pipeline`: `default_data_config()`, `make_iterator(config, batch_size=..., seed=...)`,
  and the trainers' views `image_batches` / `pre_encoded_batches`.
- `sources`, `folder`, `tar_shards`: random-access sources (folder, WebDataset tar shards,
  TFDS array_record, pre-encoded shards, shapes) and `make_source` (this host's part).
- `transforms`: decoding, RGB conversion, crop, and the reasons bad data is skipped or converted.
- `preencode`, `records`: pre-encoded ArrayRecord shards and their record format.
- `shapes`, `judge`: the synthetic set and the pixel judge of its captions.
"""
