"""Data: ``ingest/`` reads and prepares the files users bring (readers, preprocessing, CSV
layouts), ``synthetic/`` generates the embedded datasets, ``pipelines/`` decodes records into
model-ready Grain examples and batches them; ``records`` (the ArrayRecord format), ``survival``
(risk targets), ``digits`` (the ICON demo pairs), ``tfds_builder`` and ``constants`` serve all.
"""
