"""The Ray pipeline: shards, stages, replicas, commit protocol."""
