"""Extract: ImageBind features of every downloaded shard (Ray Data readers and encoder actors)."""
