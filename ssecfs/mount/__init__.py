"""The mount: the FUSE adapter (the one place that picks an errno), the daemon that builds the
store, cache and filesystem and serves them, and its control socket."""
