"""Filesystem semantics over the store and the cache: names and directories, attributes,
reading, writing, uploading. Speaks neither FUSE nor HTTP: its errors are the domain errors of
ssecfs.errors, turned into errno by the mount's adapter."""
