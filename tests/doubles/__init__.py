"""Test doubles of external HTTP APIs (Consul, Nomad) that answer like the recorded real agents."""
