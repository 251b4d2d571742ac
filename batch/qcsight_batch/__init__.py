"""qcsight_batch: bulk scoring with a model bundle, locally and as SageMaker Batch Transform."""
