"""Runs as a user handles them: build a task's state from a config, restore a training workdir or
a converted checkpoint into it, chain the runs an experiment needs first.

This layer sits above ``tasks`` (it builds them by name) and ``train`` (it builds and restores
through ``mammojax.train.build``). ``main`` runs its pretraining stages, ``evaluate`` and
``ablate`` restore through it, and ``register --model`` reads a run's config with it.
"""
