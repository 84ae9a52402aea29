"""MLflow tracking that survives a tracking-server outage."""
