"""Every bound on stopping a session or shutting the commander down, in one place.

A stop, from the inside out (each wait must be shorter than the one around it,
or the outer one gives up while the inner cleanup still has work that counts):

1. ``MODEL_CLOSE_TIMEOUT`` (1.0 s): a planner closes its in-flight model
   stream (``LLMSettings.close_timeout``, ``GuiSettings.close_timeout``), then
   records the tokens streamed so far with ``ctx.add_usage``;
2. ``STOP_CANCEL_TIMEOUT`` (1.5 s): the session waits that long for the
   cancelled planner to finish its cleanup (``Commander(stop_cancel_timeout=)``),
   then sends ``stopped`` anyway, with the usage recorded until then. Step 1
   fits inside it, so the usage of a cut-short model turn reaches
   ``stopped.final_usage``. The dispatcher's ``--stop-grace`` (2 s) must be longer.
3. ``CLOSED_TIMEOUT`` (30 s): after its terminal packet, how long a session
   waits for the dispatcher's ``SESSION_CLOSED``.

Cleanup that is not the planner's answer to the stop may outlive step 2: the
gui planner destroying its sandbox after a stop (bounded at 30 s in
``commander.gui._planner``) goes on after ``stopped`` has been sent.

Shutting down (``Commander.shutdown``):

1. ``SHUTDOWN_GRACE`` (10 s): a running session may finish by itself; after
   that it is stopped locally (bounded by ``STOP_CANCEL_TIMEOUT`` plus
   ``LOCAL_STOP_SLACK`` for the terminal packet to be written and acknowledged);
2. ``DRAIN_EOF_TIMEOUT`` (2 s): an idle slot half-closes its stream and waits
   for the dispatcher's end of stream (the slot's reader leaving); then the
   stream is cancelled.

Session hand-over (``Commander(handover_timeout=, handover_buffer=)``, the
``--handover-timeout`` and ``--handover-buffer`` flags):

* ``HANDOVER_TIMEOUT`` (60 s): how long a running session goes on without a
  dispatcher, waiting to re-attach, before it is abandoned. Longer than the
  dispatcher's ``--handover-window`` (15 s) plus a restart, so that the
  dispatcher, not the commander, decides when the task has waited too long;
* ``HANDOVER_BUFFER`` (4096 packets): the session's packets kept until the
  dispatcher acknowledges them; while attached, a full buffer makes the
  planner wait for acks; while away, it abandons the session;
* ``CONTENT_WINDOW`` (64 packets, ``--content-window``): the credit window: a
  content packet is written only while fewer of the session's packets (and
  fewer than ``commander._handover.WINDOW_CHARS`` characters of its content)
  await the dispatcher's ack, so that a ``stopped`` (never waiting for
  credit) queues behind at most that much (0: no window).

This module holds numbers only (the defaults of the settings named above) and
must not import anything of the commander.
"""

from __future__ import annotations

#: Closing a model's streamed HTTP response after a stop (inside STOP_CANCEL_TIMEOUT).
MODEL_CLOSE_TIMEOUT = 1.0
#: After a stop, how long the planner's cleanup may take before ``stopped`` is sent.
STOP_CANCEL_TIMEOUT = 1.5
#: After the terminal packet, how long to wait for ``SESSION_CLOSED``.
CLOSED_TIMEOUT = 30.0
#: On shutdown, how long a running session may go on before it is stopped.
SHUTDOWN_GRACE = 10.0
#: On shutdown, after a local stop: time for the terminal packet and its acknowledgement.
LOCAL_STOP_SLACK = 5.0
#: On shutdown, how long an idle slot waits for the dispatcher's end of stream.
DRAIN_EOF_TIMEOUT = 2.0
#: How long a session may go on without a dispatcher before it is abandoned (0: no hand-over).
HANDOVER_TIMEOUT = 60.0
#: Packets a session keeps until they are recorded.
HANDOVER_BUFFER = 4096
#: Unacknowledged packets of a session after which its content waits for credit (0: off).
CONTENT_WINDOW = 64
