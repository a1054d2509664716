"""Ray Serve deployments (Gateway, ModelServer) and the application builder."""
