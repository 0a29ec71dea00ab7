"""Grain pipelines: decoding records into model-ready examples, host augmentations, patching, and
the trainer's batching."""
