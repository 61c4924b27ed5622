"""Integration tests against real Consul and Prometheus processes."""
