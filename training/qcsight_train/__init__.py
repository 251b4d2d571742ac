"""qcsight_train: transfer learning, evaluation and export of model bundles."""
