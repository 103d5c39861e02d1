"""Programs run as Ray jobs (``ray job submit -- python -m aiwm.jobs.<name> ...``).

Each joins the running cluster, acts through the same actors as the REST API, and exits
with a code a pipeline can switch on. Importing this package imports nothing from Ray.
"""
