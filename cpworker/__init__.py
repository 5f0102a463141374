"""cpworker: a job worker pool for AWS CodePipeline custom actions."""

__version__ = "0.1.0"
