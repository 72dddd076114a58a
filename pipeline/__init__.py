"""pipeline: Ray Data readers, the Ray Train launcher, MLflow tracking and registry, batch inference."""
