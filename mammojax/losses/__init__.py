"""Losses, one module per family (risk, registration, MIL)."""
