"""Deployment beyond one machine: Kubernetes and KServe manifests, the gateway's configuration
and the Grafana dashboard, all generated from the catalog."""
