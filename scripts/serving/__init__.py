"""Server operation and clients: starting and stopping TorchServe (make serve), the management
API (register, scale, versions), the tuned profile it serves with, and the HTTP/gRPC clients."""
