"""The pipeline around the model library: data in, shards, training, evaluation, registry."""
