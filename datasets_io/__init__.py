"""From a dataset on disk to Parquet shards of validated images, and back into batches.

``import datasets_io`` imports nothing; import from the modules:

* ``paths``: the path roots (``home_dir``, ``data_dir``, ``cache_dir``) and ``IMAGE_EXTENSIONS``;
* ``records``: the format: ``Record``, ``SHARD_SCHEMA``, the manifest (``read_manifest``, ``is_ingested``);
* ``layouts``: the one registry of dataset layouts (reader, detection, capabilities, the paper's
  dataset names, demo sets) with ``read_dataset``, ``detect_layout``, ``dataset_options``, ``require``;
* ``readers``, ``lexicon``, ``images``, ``demo``: the readers, category sets / VA anchors, image
  validation, the synthetic demo data;
* ``ingest``: ``ingest(layout, root, out)``, the Ray Data job;
* ``shards``: ``ImageTransform``, ``iter_local_batches``, ``to_tensors`` (no Ray);
* ``ray_data``: ``load_split``, ``repeated_augmentation`` (Ray Data).

Only ``ingest`` and ``ray_data`` import Ray. Command line: ``python -m datasets_io {ingest,demo} ...``.
"""
