"""The GUI sandbox as a tool provider: ``computer.*`` tools over the ``lybic`` SDK.

::

    tools = SandboxTools(SandboxSettings(endpoint=..., org_id=..., api_key=...))
    provider = sandbox_provider(tools)
    await provider.run(ConnectionConfig("127.0.0.1:50051"))

The same code drives the Lybic cloud and the local sandbox server
(:mod:`localsandbox`, a package of its own, reached only over HTTP). Actions
are never retried (the SDK's client is built with ``max_retries=0``).
"""

from commander.sandbox._provider import TOOL_NAMES, sandbox_provider
from commander.sandbox._tools import SandboxSettings, SandboxTools

__all__ = ["TOOL_NAMES", "SandboxSettings", "SandboxTools", "sandbox_provider"]
