"""The store: the only code that talks to S3. `contract` is the interface the filesystem uses;
`s3` implements it with SSE-C on every request, over `transport` (awscrt, configuration from the
AWS chain); `deferred` sends deletes later, in batches, from a journal on local disk."""
