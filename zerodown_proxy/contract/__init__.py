"""The data model both sides share: the proxy's providers read it, the release commands write it.

- `model`: `Instance`, `AppState`, `RegistryState` and the rules their fields obey;
- `consul`: tag, Meta and service names, KV keys (prefix-aware), the parsing of Consul's answers
  and the one join of an instance's HTTP and HSMS services;
- `registry_file`: the local stack's registry file format;
- `status`: the `zerodown status --json` schema and what a proxy's /v1/status must report.

Nothing here does I/O; everything is importable by the orchestrator without the data plane.
"""

from .model import AppState, ContractError, Instance, RegistryState

__all__ = ["AppState", "ContractError", "Instance", "RegistryState"]
