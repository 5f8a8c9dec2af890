"""The serving runtime: worker processes, and the cluster handle the controller drives."""
