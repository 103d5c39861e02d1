"""The node agent that runs on each GPU host (``aiwm-node``); it never imports Ray.

The agent itself arrives with the node-channel issue; this package holds its place in
the distribution so the ``node`` extra has a home.
"""
