"""Embedded synthetic datasets: seeded generators written once as records, so every system
trains and tests without downloaded data."""
