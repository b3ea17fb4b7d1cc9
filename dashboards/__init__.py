"""Reports and MLflow views of sweeps."""
