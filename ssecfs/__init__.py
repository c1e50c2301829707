"""ssecfs: an S3 bucket as a directory, every object encrypted with SSE-C."""

__version__ = "0.1.0"
