"""Reading and writing shards: tar members, shard lists with counts, validated samples, decoding, pack. No torch."""
