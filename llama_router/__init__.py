"""llama-router: one OpenAI-compatible endpoint in front of many llama-server processes."""

__version__ = "0.1.0"
