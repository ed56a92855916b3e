# drimEAP behind zerodown (docker driver): one job, two task groups `blue` and `green`.
#
# Both groups always run; which one takes traffic is NOT in this file: it is the Consul KV key
# zerodown/drimeap/active, flipped by `zerodown switch`. `zerodown deploy VERSION` edits only the
# Standby group through Nomad's JSON API (image tag, ZERODOWN_VERSION, meta.version, the
# zerodown-version= tags) after a plan proves the Active group is untouched.
# JSON form (what `nomad job run -output` gives): drimeap.json next to this file.
#
# The drimEAP image listens on 8080 (HTTP) and 5000 (HSMS, passive) inside the container.

job "drimeap" {
  datacenters = ["dc1"]
  type        = "service"

  group "blue" {
    count = 2

    meta {
      version = "v1"
    }

    network {
      port "http" {
        to = 8080
      }
      port "hsms" {
        to = 5000
      }
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
      driver = "docker"

      config {
        image = "drimeap:v1"
        ports = ["http", "hsms"]
      }

      env {
        ZERODOWN_VERSION = "v1"
      }

      # Time for in-flight HTTP requests and open HSMS transactions (T3) to finish.
      kill_timeout = "45s"

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }

  group "green" {
    count = 2

    meta {
      version = "v1"
    }

    network {
      port "http" {
        to = 8080
      }
      port "hsms" {
        to = 5000
      }
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
      driver = "docker"

      config {
        image = "drimeap:v1"
        ports = ["http", "hsms"]
      }

      env {
        ZERODOWN_VERSION = "v1"
      }

      kill_timeout = "45s"

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
