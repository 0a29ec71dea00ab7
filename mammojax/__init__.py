"""mammojax: JAX/Flax longitudinal breast-cancer risk, registration and multi-scale MIL."""

__version__ = "0.1.0"
