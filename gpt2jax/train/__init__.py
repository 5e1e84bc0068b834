"""Fine-tuning: ``loop`` (the run), ``step`` (pmapped data-parallel step), ``sharding`` (FSDP step),
``data``/``batches`` (tokens and windows), ``loss``, ``optim``/``layerwise``, ``evaluate``,
``metrics``; ``memory/`` holds what trades memory for compute or exactness."""
