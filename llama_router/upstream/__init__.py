"""What serves a model: the controller, llama-server processes, lifelines, RPC workers, peers, the upstream
HTTP client, prompt caches.
"""
