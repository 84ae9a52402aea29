"""The training package: `driver` runs on the driver, `worker` on each Ray Train worker."""
