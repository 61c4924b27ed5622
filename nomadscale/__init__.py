"""nomadscale: predictive autoscaling, golden-image rollouts and scripted healing for GPU
inference fleets on HashiCorp Nomad and Consul."""

__version__ = "0.1.0"
