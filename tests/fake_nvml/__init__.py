"""A stand-in for nvidia-ml-py (see pynvml.py)."""
