"""Plots of evaluation results (matplotlib, the optional ``viz`` extra, imported lazily)."""
