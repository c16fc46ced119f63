"""The pure scheduler, its typed events, device names and the error shape: standard library only, no
asyncio, no I/O.
"""
