"""The warm worker (``ddpm serve``, ``DDPM_SERVER=auto``): one process keeps torch, diffusers, the CLI and
recently used networks loaded, and runs each ``ddpm`` call in a child forked from it.

``protocol`` is what the client and the worker share (the socket folder, the identity of an
installation, the messages); ``client`` is what a ``ddpm`` call runs before importing anything heavy;
``server`` is the worker itself, ``preload`` what it imports before forking, ``child`` what a forked call runs.
"""
