"""qcsight_core: the shared, torch-free contract between training, batch scoring and the device."""

__version__ = "0.1.0"
