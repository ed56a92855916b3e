"""Settings of the Nomad release backend, and where they come from.

- Nomad: NOMAD_ADDR, NOMAD_TOKEN, NOMAD_CACERT (the HashiCorp defaults).
- Consul: the settings the proxies use — the [consul] section of a proxy config file
  (`--config proxy.toml`, or ZERODOWN_CONFIG) with the same environment overrides the proxy
  applies (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_CACERT, ZERODOWN_CONSUL_DATACENTER,
  ZERODOWN_CONSUL_KEY_PREFIX). One loader (zerodown_proxy.config) for both sides, so a switch
  writes the key the proxies watch, in the datacenter they follow.
- ZERODOWN_ADMIN_TOKEN (or --admin-token) for the Standby preview smoke test,
  ZERODOWN_DEPLOY_TIMEOUT (seconds), ZERODOWN_STATE_DIR (the local audit log).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from zerodown_proxy.contract.consul import DEFAULT_KEY_PREFIX

from .backend import Refused
from .hashicorp_api import consul_section, env_settings
from .release_lock import ConsulReleaseLock


@dataclass(frozen=True, slots=True)
class Settings:
    nomad_addr: str
    consul_addr: str
    nomad_token: str = ""
    nomad_cacert: str = ""
    consul_token: str = ""
    consul_cacert: str = ""
    job: str | None = None
    admin_token: str = ""
    audit_log: Path | None = None
    key_prefix: str = DEFAULT_KEY_PREFIX
    datacenter: str = ""  # Consul datacenter the proxies follow ("": the agent's own)
    deploy_timeout: float = 300.0
    proxy_timeout: float = 10.0
    smoke_timeout: float = 10.0
    lock_ttl: float = ConsulReleaseLock.TTL  # the release lock's Consul session TTL


def settings_from(args: argparse.Namespace) -> Settings:
    env = env_settings()
    config = getattr(args, "config", None) or os.environ.get("ZERODOWN_CONFIG") or None
    consul = consul_section(config)
    state_dir = getattr(args, "state_dir", None) or os.environ.get("ZERODOWN_STATE_DIR")
    timeout = os.environ.get("ZERODOWN_DEPLOY_TIMEOUT", "300")
    try:
        deploy_timeout = float(timeout)
    except ValueError:
        raise Refused(f"ZERODOWN_DEPLOY_TIMEOUT must be seconds, got {timeout!r}") from None
    return Settings(
        nomad_addr=env["nomad_addr"],
        nomad_token=env["nomad_token"],
        nomad_cacert=env["nomad_cacert"],
        consul_addr=consul.addr,
        consul_token=consul.token,
        consul_cacert=consul.cacert,
        key_prefix=consul.key_prefix,
        datacenter=consul.datacenter,
        job=getattr(args, "job", None),
        admin_token=getattr(args, "admin_token", None)
        or os.environ.get("ZERODOWN_ADMIN_TOKEN", ""),
        audit_log=Path(state_dir or ".zerodown").resolve() / "history.jsonl",
        deploy_timeout=deploy_timeout,
    )
