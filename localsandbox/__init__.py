"""A local sandbox the unmodified ``lybic`` SDK can drive.

An HTTP server that speaks the part of Lybic's REST API the SDK's ``Sandbox``
uses — sandboxes list/create/get/delete, preview (screenshots),
actions/execute, process, file/copy — with the SDK's JSON shapes and its
``x-api-key`` auth. Each sandbox is a real X server (Xvfb) of its shape's size;
input is real (xdotool, through XTEST), screenshots are real (Pillow's X11
grab, served as WebP). Point ``LybicAuth(endpoint=...)`` at it and the same
code drives it and the cloud.

Run it with ``python -m localsandbox --listen 127.0.0.1:0
--addr-file F --api-key K``; it needs the Debian packages of
``scripts/install_system_deps.sh``.

A product of its own beside the commander: it must not import ``commander``,
and the commander does not import it (its ``computer.*`` tools reach this
server over HTTP through the SDK, exactly as they reach the cloud).
"""

from localsandbox._api import create_app
from localsandbox._errors import SandboxError
from localsandbox._sandboxes import PRESET_SHAPES, Limits, SandboxManager
from localsandbox._server import MissingToolsError, ServerConfig, check_tools, serve

__all__ = [
    "PRESET_SHAPES",
    "Limits",
    "MissingToolsError",
    "SandboxError",
    "SandboxManager",
    "ServerConfig",
    "check_tools",
    "create_app",
    "serve",
]
