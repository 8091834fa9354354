"""What the callback does around training: checkpoint records, the divergence check, FSDP2 shards,
logging and parameter groups."""
