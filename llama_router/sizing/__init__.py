"""Budgets per device, GGUF headers, footprints, context windows, the page cache."""
