"""Which sandboxes a task may act on, checked on every ``computer.*`` call.

A sandbox id is a capability over a whole desktop (its screen, its keyboard,
its life), and one Lybic org holds the sandboxes of every task. A model that
names another task's sandbox id must not be able to watch it, type into it or
destroy it. So a call may act only on

* a sandbox its task created through this provider (``sandbox_acquire``),
* a sandbox the dispatcher says the task was given (``Invocation.sandbox_ids``:
  the client's ``sandbox.id``, the sandbox continued from ``previous_task_id``,
  the one its session reported in use), and
* the provider's precreated sandbox (``LYBIC_PRECREATE_SID``), which every task
  of the default tenant uses by design. A named tenant's task (``Invocation.tenant``)
  may not: one desktop for every task would be shared across tenants.

Anything else is refused with ``TOOL_ERROR_CODE_DENIED`` before the sandbox API
is asked anything.
"""

from __future__ import annotations

import collections

from commander._errors import ToolDeniedError
from commander._provider import CallContext

#: Tasks whose created sandboxes are remembered; the oldest are forgotten first
#: (the dispatcher still names a task's sandbox in ``sandbox_ids`` once its
#: session reported it, so forgetting costs nothing a running task needs).
MAX_TASKS = 4096


class SandboxOwners:
    """The sandboxes each task created here, and the check of every call."""

    def __init__(self, precreate_sid: str = "", max_tasks: int = MAX_TASKS) -> None:
        self.precreate_sid = precreate_sid
        self._max_tasks = max_tasks
        self._created: collections.OrderedDict[str, set[str]] = collections.OrderedDict()

    def may_use(self, call: CallContext, sandbox_id: str) -> bool:
        """Whether ``call``'s task may act on ``sandbox_id``."""
        if not sandbox_id:
            return False
        if sandbox_id == self.precreate_sid and not call.tenant:
            return True
        if sandbox_id in call.sandbox_ids:
            return True
        return sandbox_id in self._created.get(call.task_id, ())

    def check(self, call: CallContext, sandbox_id: str) -> str:
        """``sandbox_id`` if ``call``'s task may act on it; :class:`ToolDeniedError` if not."""
        if not self.may_use(call, sandbox_id):
            task = f"task {call.task_id}" if call.task_id else "this call"
            raise ToolDeniedError(
                f"sandbox {sandbox_id[:80]!r} is not this task's: {task} may act only on "
                "the sandbox it created, the one it was given (its sandbox, or its previous "
                "task's), or the provider's precreated one"
            )
        return sandbox_id

    def created(self, call: CallContext, sandbox_id: str) -> None:
        """Record that ``call``'s task created ``sandbox_id``."""
        owned = self._created.pop(call.task_id, set())
        owned.add(sandbox_id)
        self._created[call.task_id] = owned  # most recent last
        while len(self._created) > self._max_tasks:
            self._created.popitem(last=False)

    def released(self, sandbox_id: str) -> None:
        """``sandbox_id`` is gone: no task owns it any more."""
        for task_id in [t for t, ids in self._created.items() if sandbox_id in ids]:
            ids = self._created[task_id]
            ids.discard(sandbox_id)
            if not ids:
                del self._created[task_id]
