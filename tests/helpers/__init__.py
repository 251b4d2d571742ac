"""Test helpers: generated images and a tiny real ONNX model bundle, no torch needed."""
