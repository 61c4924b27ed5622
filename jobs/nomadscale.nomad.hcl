# nomadscale itself as a Nomad job: an alternative to the systemd unit on an ops host.
# Two instances on different hosts; the Consul lock lets exactly one of them act.
job "nomadscale" {
  type      = "service"
  node_pool = "default"

  group "nomadscale" {
    count = 2

    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    # a static port: the maintenance watcher on every GPU node reports to
    # nomadscale.service.consul:9464 (jobs/maintenance-watcher.nomad.hcl), and a DNS name
    # carries no port (distinct_hosts keeps the two instances from colliding on it)
    network {
      port "http" {
        static = 9464
        to     = 9464
      }
    }

    service {
      name     = "nomadscale"
      port     = "http"
      provider = "consul" # the watcher finds it as nomadscale.service.consul

      check {
        type     = "http"
        path     = "/healthz"
        interval = "15s"
        timeout  = "3s"
      }
    }

    restart {
      attempts = 3
      interval = "10m"
      delay    = "30s"
      mode     = "delay"
    }

    update {
      max_parallel     = 1
      min_healthy_time = "30s"
      healthy_deadline = "5m"
      auto_revert      = true
    }

    task "nomadscale" {
      driver = "docker"

      config {
        image   = "registry.example.com/ops/nomadscale:0.1.0"
        command = "nomadscale"
        args    = ["run"]
        ports   = ["http"]
      }

      template {
        destination = "secrets/nomadscale.env"
        env         = true
        data        = <<-EOT
          NOMAD_ADDR=http://{{ env "attr.unique.network.ip-address" }}:4646
          CONSUL_HTTP_ADDR=http://{{ env "attr.unique.network.ip-address" }}:8500
          {{ with nomadVar "nomad/jobs/nomadscale" }}
          NOMAD_TOKEN={{ .nomad_token }}
          CONSUL_HTTP_TOKEN={{ .consul_token }}
          NOMADSCALE_PD_ROUTING_KEY={{ .pd_routing_key }}
          NOMADSCALE_WEBHOOK_SECRETS={{ .pd_webhook_secret }}
          NOMADSCALE_REPORT_TOKEN={{ .report_token }}
          {{ end }}
        EOT
      }

      env {
        NOMADSCALE_POLICIES = "/local/policies"
        PROMETHEUS_URL      = "http://prometheus.service.consul:9090"
        NOMADSCALE_LOG_JSON = "true"
        NOMADSCALE_HTTP_HOST = "0.0.0.0" # inside the container: reached through the port map
      }

      artifact {
        source      = "git::https://git.example.com/ops/nomadscale-policies.git//policies"
        destination = "local/policies"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
