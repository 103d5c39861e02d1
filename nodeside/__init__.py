"""The node agent that runs on each GPU host (``aiwm-node``); it never imports Ray.

``agent`` (the connection loop and ``main``; also ``python -m nodeside.agent``),
``config`` (settings from the environment), ``telemetry`` (host facts and metrics),
``handlers`` (the commands it runs) and ``spool`` (results on disk until the
controller acknowledges them). From ``aiwm`` it imports only ``aiwm.protocol``,
``aiwm.backoff`` and the version. Its dependencies are the ``node`` extra; see
docs/protocol.md for installing it without Ray.
"""
