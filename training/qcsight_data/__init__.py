"""Labelled image datasets, off the device: indexing folders, CSVs and AWS manifests, splitting, fingerprinting,
synthetic datasets, and the `qcsight data` command.

Torch-free (numpy and OpenCV, through qcsight_core), so a laptop or a batch host can prepare
data without the train extra; training and batch may import it, the device code never does.
"""
