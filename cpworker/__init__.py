"""cpworker: a job worker pool for AWS CodePipeline custom actions.

The handler API::

    from cpworker import Continue, Failed, JobContext, Succeeded

    async def build(job: JobContext) -> Succeeded | Failed | Continue: ...
"""

from cpworker.context import JobContext
from cpworker.outcomes import Continue, Failed, Outcome, Succeeded

__all__ = ["Continue", "Failed", "JobContext", "Outcome", "Succeeded", "__version__"]
__version__ = "0.1.0"
