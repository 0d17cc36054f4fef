"""Logging setup of the entry points: text or JSON lines, with the session's ids.

The session runner sets :data:`session_ids` for its task (and the planner task
it starts, which copies the context), so every record logged on behalf of a
session carries ``task_id`` and ``session_id`` in JSON output. Records logged
with ``extra={"task_id": ..., "session_id": ...}`` (``SessionContext.logger``)
carry theirs. Only the message and these ids are written: never the arguments
of a call or any other attribute of the record.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging

#: (task_id, session_id) of the session the current task works for, if any.
session_ids: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "commander_session_ids", default=None
)

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message,
    task_id/session_id when known, exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        session_id = getattr(record, "session_id", None)
        if task_id is None and session_id is None:
            ids = session_ids.get()
            if ids is not None:
                task_id, session_id = ids
        if task_id:
            entry["task_id"] = str(task_id)
        if session_id:
            entry["session_id"] = str(session_id)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Configure the root logger: ``level``, and ``text`` or ``json`` lines on stderr."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])
    # httpx logs every request URL at INFO; keep that for DEBUG.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
