"""Installers: the venv, llama-server and rpc-server."""
