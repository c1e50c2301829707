"""Keys and sealing: key files and the key ring (SSE-C parameters, the derived cache key) and
the AEAD that seals cache chunks and journal records. Imports nothing of the project but
ssecfs.errors."""
