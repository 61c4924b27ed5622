# GPU inference workers: one task group per zone, one worker per one-GPU node.
# nomadscale scales each group through the Scale API (min/max below bound it).
job "ml-worker" {
  namespace   = "ekyc"
  type        = "service"
  node_pool   = "gpu-l4"
  datacenters = ["zone-a", "zone-b"]

  update {
    max_parallel      = 1
    canary            = 1
    auto_revert       = true
    auto_promote      = false
    health_check      = "checks"
    min_healthy_time  = "30s"
    healthy_deadline  = "10m"
    progress_deadline = "20m"
  }

  group "ml-worker-a" {
    count = 2

    constraint {
      attribute = "${node.datacenter}"
      value     = "zone-a"
    }

    scaling {
      enabled = true
      min     = 1
      max     = 40
    }

    network {
      port "http" {
        to = 8080
      }
    }

    service {
      name     = "ml-worker"
      port     = "http"
      provider = "consul"
      tags     = ["zone-a"]

      check {
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "worker" {
      driver = "docker"

      config {
        image              = "registry.example.com/ekyc/ml-worker:2026.10.2"
        ports              = ["http"]
        image_pull_timeout = "30m"
      }

      meta {
        image_size_gb = "7"
      }

      resources {
        cpu    = 4000
        memory = 16384

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }

  group "ml-worker-b" {
    count = 2

    constraint {
      attribute = "${node.datacenter}"
      value     = "zone-b"
    }

    scaling {
      enabled = true
      min     = 1
      max     = 40
    }

    network {
      port "http" {
        to = 8080
      }
    }

    service {
      name     = "ml-worker"
      port     = "http"
      provider = "consul"
      tags     = ["zone-b"]

      check {
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "worker" {
      driver = "docker"

      config {
        image              = "registry.example.com/ekyc/ml-worker:2026.10.2"
        ports              = ["http"]
        image_pull_timeout = "30m"
      }

      meta {
        image_size_gb = "7"
      }

      resources {
        cpu    = 4000
        memory = 16384

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }
}
