"""The control plane: process wiring, workers, health checks, the admin API, metrics, logs and signals."""
