"""qcsight_cloud: the cloud side of the loop (ingestion, alert/metrics store, fleet view, retraining policy).

Runs as Lambda handlers behind IoT rules in AWS and as one local process against the loopback
broker and SQLite; never imports torch.
"""
