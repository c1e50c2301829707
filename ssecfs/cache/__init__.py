"""The encrypted local cache: plaintext chunks sealed on disk, the dirty-data journal that
survives a crash, accounting and eviction within a bound. Knows nothing of S3 or of files'
names beyond the opaque ids it is given."""
