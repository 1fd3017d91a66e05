"""Data-parallel and sharded training, one rank at a time: DDP, FSDP2 (``fully_shard``) and ZeRO."""
