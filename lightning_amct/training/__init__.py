"""What the callback does around training: checkpoint records, the divergence check, FSDP2 shards,
its own collectives, logging and parameter groups."""
