"""The node agent that runs on each GPU host (``aiwm-node``); it never imports Ray.

``agent`` (the connection loop and ``main``; also ``python -m nodeside.agent``),
``config`` (settings from the environment), ``telemetry`` (host facts and metrics),
``handlers`` (the command table, the system commands and ``CommandFailed``),
``deployments`` (the ``deployment.*`` commands, ``deployment.status`` reports and the
watcher), ``models`` (the model cache and the ``model.*`` commands), ``runtimes``
(where model servers run: ``runtimes.docker`` and ``runtimes.process``) and ``spool``
(results on disk until the controller acknowledges them). From ``aiwm`` it imports
only ``aiwm.protocol``, ``aiwm.backoff`` and the version. Its dependencies are the
``node`` extra; see docs/protocol.md for installing it without Ray.
"""
