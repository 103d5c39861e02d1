"""The Ray Serve application: the FastAPI ingress for REST (and, later, node sockets)."""
