"""The store: the only code that talks to S3. `contract` is the interface the filesystem uses
(the Store protocol, its values, S3's limits); `s3` implements it with SSE-C on every request,
composing `s3requests` (requests, error translation), `ssec` (key choice, echo checks),
`multipart`, `copies`, `listing` and `probe` (mount-time checks); requests go through
`client` (awscrt), configured by `transport` (resolved from the AWS chain); `deferred` sends
deletes later, in batches (`delqueue`), from a journal on local disk (`deljournal`)."""
