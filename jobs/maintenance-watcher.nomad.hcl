# GCE host-maintenance watcher: one instance on every GPU node. It long-polls the metadata
# server's instance/maintenance-event and reports notices to nomadscale, which runs the
# gpu-host-maintenance runbook (ineligible, surge, drain, wait, GPU check, eligible).
job "maintenance-watcher" {
  type      = "system"
  node_pool = "gpu-l4"
  priority  = 90

  group "watcher" {
    restart {
      attempts = 10
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    task "watch" {
      driver = "exec"

      config {
        command = "/usr/local/bin/nomadscale"
        args = [
          "watch-maintenance",
          "--report-url", "${NOMADSCALE_REPORT_URL}",
          "--node-id", "${node.unique.id}",
        ]
      }

      env {
        NOMADSCALE_REPORT_URL = "http://nomadscale.service.consul:9464/maintenance/report"
        NOMADSCALE_LOG_JSON   = "true"
      }

      # The report token comes from Nomad Variables (nomad/jobs/maintenance-watcher), never
      # from the job file.
      template {
        destination = "secrets/env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/maintenance-watcher" }}NOMADSCALE_REPORT_TOKEN={{ .report_token }}{{ end }}
        EOT
      }

      resources {
        cpu    = 50
        memory = 64
      }
    }

    # Post-maintenance GPU check. The node is still ineligible when nomadscale asks, so a new
    # batch job could not be placed; this system task (kept through drains) answers instead:
    # when node meta gpu.check.request changes it runs nvidia-smi + the kernel-log Xid scan and
    # writes the raw output back as gpu.check.* (`nomadscale gpu-check`, the script in
    # nomadscale/healing/gpucheck.py CHECK_SCRIPT); nomadscale parses it into the verdict.
    task "gpu-check" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args    = ["-c", "while true; do req=$(nomad node meta read -node-id \"$NODE_ID\" -json | jq -r '.Meta[\"gpu.check.request\"] // empty'); done_id=$(nomad node meta read -node-id \"$NODE_ID\" -json | jq -r '.Meta[\"gpu.check.id\"] // empty'); if [ -n \"$req\" ] && [ \"$req\" != \"$done_id\" ]; then /usr/local/bin/nomadscale gpu-check --check-id \"$req\"; fi; sleep 5; done"]
      }

      env {
        NODE_ID = "${node.unique.id}"
      }

      template {
        destination = "secrets/env"
        env         = true
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/maintenance-watcher" }}NOMAD_TOKEN={{ .node_meta_token }}{{ end }}
        EOT
      }

      resources {
        cpu    = 50
        memory = 64
      }
    }
  }
}
