"""The one request path and its rules."""
