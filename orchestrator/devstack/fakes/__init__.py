"""Fakes of the Consul and Nomad HTTP APIs that answer like the recorded real agents, for tests,
benchmarks and demos on a machine without the agents."""
