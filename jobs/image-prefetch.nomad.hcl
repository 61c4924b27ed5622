# Pulls a worker image onto every eligible GPU node before a rolling deployment.
# Dispatch with: nomad job dispatch -namespace ekyc -meta image=<ref> image-prefetch
job "image-prefetch" {
  namespace   = "ekyc"
  type        = "sysbatch"
  node_pool   = "gpu-l4"
  datacenters = ["*"]

  parameterized {
    payload       = "forbidden"
    meta_required = ["image"]
  }

  group "prefetch" {
    task "pull" {
      driver = "docker"

      config {
        image              = "${NOMAD_META_image}"
        image_pull_timeout = "30m"
        entrypoint         = ["/bin/true"]
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
