"""Archive building: weights and model_store/*.mar from models/catalog.yaml, their fidelity gates,
the generated config.properties and gRPC stubs, and a worker's loader for in-process use."""
