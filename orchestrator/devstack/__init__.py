"""The local development stack: the sample drimEAP app (HTTP + HSMS host), the equipment
simulator, the demo, and fakes of the Consul and Nomad HTTP APIs. Not orchestration: the pieces
the local stack, the tests and the benchmarks run *against*."""
