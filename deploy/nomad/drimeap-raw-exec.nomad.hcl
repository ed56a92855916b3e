# drimEAP behind zerodown, raw_exec variant for hosts without Docker: each allocation runs
# `zerodown sample-app` (the sample drimEAP backend); `zerodown` must be on the client's PATH.
# One job, two task groups `blue` and `green`.
#
# Both groups always run; which one takes traffic is NOT in this file: it is the Consul KV key
# zerodown/drimeap/active, flipped by `zerodown switch`. `zerodown deploy VERSION` edits only the
# Standby group through Nomad's JSON API (image tag, ZERODOWN_VERSION, meta.version, the
# zerodown-version= tags) after a plan proves the Active group is untouched.
# JSON form (what `nomad job run -output` gives): drimeap-raw-exec.json next to this file.
# raw_exec must be enabled on the client (`nomad agent -dev` does; otherwise
# plugin "raw_exec" { config { enabled = true } }).

job "drimeap" {
  datacenters = ["dc1"]
  type        = "service"

  group "blue" {
    count = 2

    meta {
      version = "v1"
    }

    network {
      port "http" {}
      port "hsms" {}
    }

    # Standby takes no traffic, so replacing the whole group at once is safe and fastest.
    # No canaries: a canary would register with this group's tags and become routable.
    # auto_revert returns a failed Standby to its last stable version; Active is never involved.
    update {
      max_parallel      = 2
      canary            = 0
      health_check      = "checks"
      min_healthy_time  = "5s"
      healthy_deadline  = "2m"
      progress_deadline = "5m"
      auto_revert       = true
      auto_promote      = false
    }

    service {
      name = "drimeap"
      port = "http"
      tags = ["zerodown-group=blue", "zerodown-version=v1"]

      check {
        name     = "http"
        type     = "http"
        path     = "/health"
        interval = "2s"
        timeout  = "1s"
      }
    }

    service {
      name = "drimeap-hsms"
      port = "hsms"
      tags = ["zerodown-group=blue", "zerodown-version=v1"]

      check {
        name     = "hsms-tcp"
        type     = "tcp"
        interval = "2s"
        timeout  = "1s"
      }
    }

    task "app" {
      driver = "raw_exec"

      config {
        command = "zerodown"
        args = [
          "sample-app",
          "--version", "${NOMAD_META_version}",
          "--host", "${NOMAD_IP_http}",
          "--http-port", "${NOMAD_PORT_http}",
          "--hsms-port", "${NOMAD_PORT_hsms}",
          "--instance-id", "${NOMAD_ALLOC_NAME}",
        ]
      }

      env {
        ZERODOWN_VERSION = "v1"
      }

      # Time for in-flight HTTP requests and open HSMS transactions (T3) to finish.
      kill_timeout = "45s"

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }

  group "green" {
    count = 2

    meta {
      version = "v1"
    }

    network {
      port "http" {}
      port "hsms" {}
    }

    update {
      max_parallel      = 2
      canary            = 0
      health_check      = "checks"
      min_healthy_time  = "5s"
      healthy_deadline  = "2m"
      progress_deadline = "5m"
      auto_revert       = true
      auto_promote      = false
    }

    service {
      name = "drimeap"
      port = "http"
      tags = ["zerodown-group=green", "zerodown-version=v1"]

      check {
        name     = "http"
        type     = "http"
        path     = "/health"
        interval = "2s"
        timeout  = "1s"
      }
    }

    service {
      name = "drimeap-hsms"
      port = "hsms"
      tags = ["zerodown-group=green", "zerodown-version=v1"]

      check {
        name     = "hsms-tcp"
        type     = "tcp"
        interval = "2s"
        timeout  = "1s"
      }
    }

    task "app" {
      driver = "raw_exec"

      config {
        command = "zerodown"
        args = [
          "sample-app",
          "--version", "${NOMAD_META_version}",
          "--host", "${NOMAD_IP_http}",
          "--http-port", "${NOMAD_PORT_http}",
          "--hsms-port", "${NOMAD_PORT_hsms}",
          "--instance-id", "${NOMAD_ALLOC_NAME}",
        ]
      }

      env {
        ZERODOWN_VERSION = "v1"
      }

      kill_timeout = "45s"

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
