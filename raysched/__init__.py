"""raysched: an autopilot for Ray task resources."""
