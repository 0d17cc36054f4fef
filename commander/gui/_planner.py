"""The ``gui`` planner: screenshot → model → parse → brokered action, until done.

Each step:

1. ``computer.screenshot`` (a brokered tool call) — streamed as an
   ``Artifact`` and sent to the model as a base64 data URL;
2. the model (any OpenAI-compatible endpoint) answers in the UI-TARS format
   (or pyautogui code); its text streams as ``thought``;
3. :func:`commander.gui.parse_model_output` reads it with a whitelisting
   parser (never ``eval``); a parse error goes back to the model as the next
   observation;
4. every action becomes a brokered ``computer.*`` tool call; the dispatcher
   checks, routes and times it, and refuses it after a stop.

The loop ends with ``finished`` (SUCCESS, its content is the result), with
``failed``, the step limit (``config.steps``, default 50) or the deadline
(``taskTimeout``) — all three FAILURE with the reason. ``call_user`` waits for
a user message (an interjection) and goes on with it.

FAST mode: one model does everything. NORMAL mode: the action model decides,
and a grounding model (``stageModelConfig.groundingModel``) places the point
of each click, move or scroll from the step's thought.

Endpoints: a model endpoint the task names itself must be on
``GuiSettings.allowed_endpoints`` and gets the task's own key or none (see
:func:`commander._llm.target_from`); otherwise the session fails before a
sandbox is acquired or a request is sent.

Observation: a vision model gets the screenshot; a text-only model
(``observation="text"``; ``auto`` picks it for the models of
``GuiSettings.text_only_models``, e.g. SmolLM2) gets ``computer.describe_screen``
— screen size, visible windows with title and geometry, keyboard focus,
pointer — and answers with one JSON action object whose schema constrains its
decoding (``response_format``), so every answer parses. ``both`` sends both.

Model calls are retried (tenacity) only when nothing was streamed yet and the
error is a connection error, a timeout before the first token, 429 or 5xx.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fnmatch
import functools
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal, Protocol, cast

import anyio
import openai
from openai.types.chat import ChatCompletionChunk
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from commander import _llm, _metrics
from commander._context import PlannerOutput, SessionContext
from commander._errors import ToolError, ToolExecutionError, tool_error_code_name
from commander._gen.dispatch.v1 import interaction_pb2 as ipb
from commander._gen.lybic.agent import agent_pb2
from commander._llm import ModelTarget
from commander._pricing import PriceTable
from commander._timeouts import MODEL_CLOSE_TIMEOUT
from commander._tracing import end_model_span, model_span
from commander.gui import (
    JSON_ACTION_SCHEMA,
    CoordinateSpace,
    OutputFormat,
    ParsedOutput,
    ParseError,
    Relative1000,
    ScreenPixels,
    ScreenSize,
    SmartResizedPixels,
    parse_model_output,
)
from commander.gui import _actions as act
from commander.gui._coords import to_screen

_log = logging.getLogger("commander.gui")

DEFAULT_STEPS = 50
DEFAULT_TASK_TIMEOUT = 3600
#: Model outputs parsed at once, over all sessions of a planner. Parsing is linear in
#: the output (at most 64,000 characters) but CPU-bound: it runs in a worker thread,
#: never on the event loop, and this bounds the cores it can take.
PARSE_CONCURRENCY = 2

#: The UI-TARS computer-use prompt (ByteDance UI-TARS, ``COMPUTER_USE``).
UITARS_PROMPT = r"""You are a GUI agent. You are given a task and your action history, with screenshots. You need to perform the next action to complete the task.

## Output Format
```
Thought: ...
Action: ...
```

## Action Space

click(point='<point>x1 y1</point>')
left_double(point='<point>x1 y1</point>')
right_single(point='<point>x1 y1</point>')
drag(start_point='<point>x1 y1</point>', end_point='<point>x2 y2</point>')
hotkey(key='ctrl c') # Split keys with a space and use lowercase. Also, do not use more than 3 keys in one hotkey action.
type(content='xxx') # Use escape characters \', \", and \n in content part to ensure we can parse the content in normal python string format. If you want to submit your input, use \n at the end of content.
scroll(point='<point>x1 y1</point>', direction='down or up or right or left') # Show more information on the `direction` side.
wait() #Sleep for 5s and take a screenshot to check for any changes.
finished(content='xxx') # Use escape characters \', \", and \n in content part to ensure we can parse the content in normal python string format.
call_user() # Submit the task and call the user when the task is unsolvable, or when you need the user's help.

## Note
- Use English in `Thought` part.
- Write a small plan and finally summarize your next action (with its target element) in one sentence in `Thought` part.

## User Instruction
{instruction}
"""  # noqa: E501 (the prompt is verbatim)

#: The prompt for pyautogui-style models (screen pixels of the screenshot as given).
PYAUTOGUI_PROMPT = """You control a computer with pyautogui. The screen is {width}x{height} pixels.
Look at the screenshot and answer with your reasoning, then one ```python code block
with pyautogui calls (click, doubleClick, rightClick, moveTo, dragTo, scroll, write,
press, hotkey) using literal arguments only. Write DONE when the task is complete,
FAIL if it cannot be done, WAIT to wait.

Task: {instruction}
"""

#: The prompt for the JSON action format (text-only models; screen pixels).
JSON_PROMPT = """You operate a computer. Each step you get a description of the screen \
and answer with one JSON object:
{"thought": "...", "action": "...", "x": 0, "y": 0, "text": "..."}
Actions: type (write "text" into the focused window; "\\n" presses Enter), hotkey (press \
the keys in "text", e.g. "ctrl c" or "enter"), click / double_click / right_click / move \
(at pixel x, y), scroll ("text": up or down), wait, finished ("text": your answer; only \
when the task is done), failed ("text": why), call_user (ask the user for help).

Example. Task: Type 'abc' into the terminal.
Step 1 answer: {"thought": "The terminal has focus, so I type the text.", "action": "type", \
"x": 0, "y": 0, "text": "abc\\n"}
Step 2 answer: {"thought": "I typed the text; the task is done.", "action": "finished", \
"x": 0, "y": 0, "text": "typed abc"}

Task: {instruction}"""

#: Models that cannot see images (``observation="auto"`` gives them text); fnmatch,
#: case-insensitive, on the model name.
TEXT_ONLY_MODELS = ("*smollm*", "*tinyllama*")

Observation = Literal["auto", "screenshot", "text", "both"]
FormatSetting = Literal["auto", "ui-tars", "pyautogui", "json"]
ResponseFormat = Literal["llama-cpp", "json-schema", "off"]

#: The UI-TARS grounding prompt (NORMAL mode's grounding model).
GROUNDING_PROMPT = (
    "Output only the coordinate of one point in your response. "
    "What element matches the following task: {target}"
)

_N = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_GROUNDED_POINT = re.compile(
    rf"<point>\s*({_N})[\s,]+({_N})\s*</point>|\(\s*({_N})\s*,\s*({_N})\s*\)|\[\s*({_N})\s*,\s*({_N})"
)

SpaceName = Literal["relative", "smart-resize", "screen"]


def coordinate_space(name: str) -> CoordinateSpace:
    """``relative`` (0..1000), ``smart-resize`` (UI-TARS-1.5) or ``screen`` pixels."""
    spaces: dict[str, CoordinateSpace] = {
        "relative": Relative1000(),
        "smart-resize": SmartResizedPixels(),
        "screen": ScreenPixels(),
    }
    try:
        return spaces[name]
    except KeyError:
        raise ValueError(f"unknown coordinate space {name!r}; one of {', '.join(spaces)}") from None


@dataclasses.dataclass(frozen=True)
class GuiSettings:
    """The gui planner's defaults (a task's config overrides models, steps and timeout)."""

    base_url: str = _llm.DEFAULT_BASE_URL
    model: str = "ui-tars"
    #: The operator's key (``GUI_LLM_API_KEY``): sent only to ``base_url``.
    api_key: str = dataclasses.field(default=_llm.DEFAULT_API_KEY, repr=False)
    #: NORMAL mode's grounding model when the task's config names none (None: the
    #: action model's own coordinates are used). The operator's too: its key goes
    #: only to its endpoint.
    grounding: ModelTarget | None = None
    #: URL prefixes a task may name as its own endpoint besides the two above
    #: (``--llm-allowed-endpoints``); see :func:`commander._llm.check_endpoint`.
    allowed_endpoints: tuple[str, ...] = ()
    #: "auto": "json" for a text observation, else "ui-tars".
    output_format: FormatSetting = "auto"
    #: What the model is shown: "auto" is "text" for TEXT_ONLY_MODELS, else "screenshot".
    observation: Observation = "auto"
    text_only_models: tuple[str, ...] = TEXT_ONLY_MODELS
    #: How the JSON format's schema is sent: llama-cpp-python's
    #: ``{"type": "json_object", "schema": …}``, OpenAI's ``json_schema``, or not at all.
    response_format: ResponseFormat = "llama-cpp"
    #: Step limit when the task's config sets none.
    steps: int = DEFAULT_STEPS
    #: Screen descriptions kept in the conversation (text observation).
    history_descriptions: int = 3
    coordinates: SpaceName = "relative"
    grounding_coordinates: SpaceName = "relative"
    #: Shape of the sandbox created when the task names none ("": the provider's default).
    shape: str = ""
    #: Screenshots kept in the conversation sent to the model (older ones dropped).
    history_images: int = 3
    read_timeout: float = 120.0
    connect_timeout: float = 10.0
    temperature: float | None = 0.0
    max_tokens: int | None = 1024
    #: Attempts of a model call that failed before any token (connection, 429, 5xx).
    model_attempts: int = 3
    #: Parse errors in a row before the task fails.
    max_parse_errors: int = 3
    #: Pause after the actions of a step, so the screen settles before the next shot.
    settle_seconds: float = 0.3
    #: Bound on closing the model stream after a stop (see commander._timeouts).
    close_timeout: float = MODEL_CLOSE_TIMEOUT
    #: Default price table (cost in ExecutionStatistics).
    prices: PriceTable = dataclasses.field(default_factory=PriceTable)

    def __post_init__(self) -> None:
        _llm.parse_allowed_endpoints(self.allowed_endpoints)  # ValueError for a bad entry


@dataclasses.dataclass
class _Reply:
    text: str = ""
    pieces: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


def _is_retryable(exc: openai.OpenAIError) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return False


def resolve_models(
    config: agent_pb2.CommonConfig, settings: GuiSettings
) -> tuple[ModelTarget, ModelTarget | None, bool]:
    """(action model, grounding model or None, fast) from the task config over the defaults.

    The operator's keys go only with the operator's endpoints (see
    :func:`commander._llm.target_from`).
    """
    default = ModelTarget(settings.base_url, settings.model, settings.api_key)
    operator = (default,) if settings.grounding is None else (default, settings.grounding)
    fast = config.mode != agent_pb2.NORMAL
    stages = config.stageModelConfig if config.HasField("stageModelConfig") else None
    action = default
    if stages is not None:
        order = (
            ("fastActionGeneratorModel", "actionGeneratorModel")
            if fast
            else ("actionGeneratorModel",)
        )
        for field in order:
            if stages.HasField(field):  # type: ignore[arg-type]
                action = _llm.target_from(getattr(stages, field), default, operator)
                break
    grounding: ModelTarget | None = None
    if not fast:
        if stages is not None and stages.HasField("groundingModel"):
            grounding = _llm.target_from(stages.groundingModel, action, operator)
        else:
            grounding = settings.grounding
    return action, grounding, fast


def resolve_io(settings: GuiSettings, model: str) -> tuple[Observation, OutputFormat]:
    """(observation, output format) for ``model``: ``auto`` resolved by its name."""
    observation = settings.observation
    if observation == "auto":
        name = model.lower()
        text_only = any(fnmatch.fnmatchcase(name, p.lower()) for p in settings.text_only_models)
        observation = "text" if text_only else "screenshot"
    fmt: OutputFormat
    if settings.output_format == "auto":
        fmt = "json" if observation == "text" else "ui-tars"
    else:
        fmt = settings.output_format
    return observation, fmt


def _describe_action(action: act.Action) -> str:
    """One line for the model about an action that was performed."""
    match action:
        case act.KeyboardType():
            return f"typed {action.content!r}"
        case act.KeyboardHotkey():
            return f"pressed {action.keys}"
        case act.MouseClick() | act.MouseDoubleClick() | act.MouseTripleClick():
            return f"{type(action).__name__} at x={action.at.x} y={action.at.y}"
        case act.MouseMove():
            return f"moved the pointer to x={action.to.x} y={action.to.y}"
        case act.MouseScroll():
            return f"scrolled {action.step_vertical:+d} down, {action.step_horizontal:+d} right"
        case act.Wait():
            return f"waited {action.duration_ms} ms"
    return action.type


def _shorten_images(messages: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """The conversation with all but the last ``keep`` screenshots replaced by a note."""
    seen = 0
    out: list[dict[str, Any]] = []
    for message in reversed(messages):
        content = message.get("content")
        if isinstance(content, list) and any(p.get("type") == "image_url" for p in content):
            seen += 1
            if seen > keep:
                parts = [p for p in content if p.get("type") != "image_url"]
                parts.append({"type": "text", "text": "(an earlier screenshot, omitted)"})
                message = {**message, "content": parts}
        out.append(message)
    out.reverse()
    return out


class _Outcome(Exception):
    """Ends the step loop with a result (raised inside, caught at the top)."""

    def __init__(self, outcome: ipb.SessionOutcome.ValueType, result: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.result = result
        self.message = message


class LocalSandboxes(Protocol):
    """What the gui planner uses of an in-process sandbox provider's
    :class:`~commander.sandbox.SandboxTools` (typed here so that this module
    does not import the sandbox package and its SDK)."""

    async def release(self, sandbox_id: str) -> object: ...

    async def aclose(self) -> None: ...


class GuiPlanner:
    """The ``gui`` planner (register it under any name; ``gui`` by default).

    Every sandbox operation goes through the dispatcher as a brokered
    ``computer.*`` tool call, with one exception: destroying the sandbox
    (``destroySandbox``) after a stop. A stop ends the session's right to call
    tools — the dispatcher refuses every later tool call of the session, so
    that a stopped agent cannot act — and ``computer.sandbox_release`` is
    refused too. So after a stop the sandbox is destroyed through
    ``local_tools``, the :class:`~commander.sandbox.SandboxTools` of an
    in-process sandbox provider (the code that serves
    ``computer.sandbox_release``), when there is one; otherwise the sandbox's
    own ``maxLifeSeconds`` (the task's timeout plus 5 minutes) ends it.
    ``local_tools`` is closed by :meth:`aclose` when ``close_tools``.
    """

    def __init__(
        self,
        settings: GuiSettings | None = None,
        *,
        local_tools: LocalSandboxes | None = None,
        close_tools: bool = False,
    ) -> None:
        self.settings = settings or GuiSettings()
        self.local_tools = local_tools
        self._close_tools = close_tools
        #: The HTTP pool of every session's model calls; its clients never retry
        #: (retries are ours, and only before the first token).
        self.clients = _llm.ModelClients(
            read_timeout=self.settings.read_timeout,
            connect_timeout=self.settings.connect_timeout,
        )
        # Made on first use: a limiter belongs to the running event loop.
        self._parse_limiter: anyio.CapacityLimiter | None = None

    async def parse(
        self,
        text: str,
        *,
        output_format: OutputFormat,
        screen: ScreenSize,
        space: CoordinateSpace,
    ) -> ParsedOutput:
        """:func:`~commander.gui.parse_model_output` in a worker thread (at most
        :data:`PARSE_CONCURRENCY` at once), so the event loop never waits on it. Not
        abandoned on cancellation: it ends within its bounded time anyway."""
        if self._parse_limiter is None:
            self._parse_limiter = anyio.CapacityLimiter(PARSE_CONCURRENCY)
        parse = functools.partial(
            parse_model_output, text, output_format=output_format, screen=screen, space=space
        )
        return await anyio.to_thread.run_sync(parse, limiter=self._parse_limiter)

    async def aclose(self) -> None:
        """Close the shared HTTP pool (the commander calls this when it stops), and
        ``local_tools`` when ``close_tools`` (its provider has stopped by then)."""
        await self.clients.aclose()
        if self._close_tools and self.local_tools is not None:
            await self.local_tools.aclose()

    async def __call__(self, ctx: SessionContext) -> AsyncIterator[PlannerOutput]:
        run = _Run(self, ctx)
        try:
            async with contextlib.aclosing(run.steps()) as outputs:
                async for output in outputs:
                    yield output
        finally:
            await run.aclose_cleanup()


class _Run:
    """One session of the gui planner."""

    def __init__(self, planner: GuiPlanner, ctx: SessionContext) -> None:
        self.planner = planner
        self.settings = planner.settings
        self.ctx = ctx
        config = ctx.config
        self.max_steps = config.steps if config.HasField("steps") and config.steps > 0 else 0
        self.max_steps = self.max_steps or self.settings.steps or DEFAULT_STEPS
        timeout = (
            config.taskTimeout
            if config.HasField("taskTimeout") and config.taskTimeout > 0
            else DEFAULT_TASK_TIMEOUT
        )
        own_deadline = time.monotonic() + timeout
        remaining = ctx.time_remaining()
        self.deadline = (
            own_deadline if remaining is None else min(own_deadline, time.monotonic() + remaining)
        )
        self.action_model, self.grounding_model, self.fast = resolve_models(config, self.settings)
        self.observation, self.output_format = resolve_io(self.settings, self.action_model.model)
        # The JSON format speaks screen pixels (the text observation gives pixels).
        self.space = (
            ScreenPixels()
            if self.output_format == "json"
            else coordinate_space(self.settings.coordinates)
        )
        #: (index in messages, content without the description) of text observations.
        self._described: list[tuple[int, str]] = []
        self.grounding_space = coordinate_space(self.settings.grounding_coordinates)
        self.sandbox_id = ""
        self.release_pending = False
        self.screen = ScreenSize(1280, 720)
        self.cursor: tuple[int, int] | None = None
        self.messages: list[dict[str, Any]] = []
        self.steps_done = 0

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # --- the loop ---

    async def steps(self) -> AsyncGenerator[PlannerOutput, None]:
        ctx = self.ctx
        outcome: _Outcome | None = None
        # Before anything is done: a refused endpoint fails the session with the reason.
        for target in (self.action_model, self.grounding_model):
            if target is not None:
                await _llm.check_endpoint(
                    target,
                    self.settings.allowed_endpoints,
                    resolve_timeout=self.settings.connect_timeout,
                )
        try:
            yield ipb.StageChange(stage="sandbox", message="acquiring a sandbox")
            await self._acquire()
            # The dispatcher keeps it on the task, for a task that continues this one.
            yield ipb.SandboxInUse(
                sandbox=agent_pb2.Sandbox(id=self.sandbox_id), kept=not self.release_pending
            )
            yield ipb.StageChange(
                stage="sandbox",
                message=f"sandbox {self.sandbox_id} ({self.screen.width}x{self.screen.height})",
            )
            self._start_conversation()
            feedback: list[str] = []
            parse_errors = 0
            while True:
                if self.steps_done >= self.max_steps:
                    raise _Outcome(
                        ipb.SESSION_OUTCOME_FAILURE,
                        "",
                        f"out of steps: the task was not finished in {self.max_steps} steps",
                    )
                self._check_deadline()
                step = self.steps_done + 1
                step_started = time.monotonic()
                shot = await self._call("computer.screenshot", sandbox_id=self.sandbox_id)
                image_b64, mime = self._take_screenshot(shot)
                yield ipb.Artifact(
                    kind="screenshot",
                    mime_type=mime,
                    data=base64.b64decode(image_b64),
                    description=f"step {step}: the screen before the model's action",
                )
                feedback.extend(f"The user says: {u.text}" for u in ctx.drain_user_inputs())
                description = ""
                if self.observation in ("text", "both"):
                    description = await self._describe(step)
                if self.observation == "text":
                    short = "\n".join([*feedback, f"Step {step}."])
                    self._described.append((len(self.messages), short))
                    self.messages.append(
                        {"role": "user", "content": "\n".join([*feedback, description])}
                    )
                else:
                    parts: list[dict[str, Any]] = [{"type": "text", "text": t} for t in feedback]
                    if description:
                        parts.append({"type": "text", "text": description})
                    parts.append(
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:{mime};base64,{image_b64}"},
                        }
                    )
                    self.messages.append({"role": "user", "content": parts})
                feedback = []
                reply = _Reply()
                async with contextlib.aclosing(
                    self._model_turn(self.action_model, self.messages, reply, f"step {step}")
                ) as outputs:
                    async for output in outputs:
                        yield output
                self.steps_done += 1
                yield self._usage(self.action_model, reply, steps=1)
                self.messages.append({"role": "assistant", "content": reply.text})
                try:
                    parsed = await self.planner.parse(
                        reply.text,
                        output_format=self.output_format,
                        screen=self.screen,
                        space=self.space,
                    )
                except ParseError as exc:
                    parse_errors += 1
                    yield ipb.ErrorSignal(code=exc.code, message=exc.message)
                    if parse_errors >= self.settings.max_parse_errors:
                        raise _Outcome(
                            ipb.SESSION_OUTCOME_FAILURE,
                            "",
                            f"the model's output could not be parsed {parse_errors} times in a "
                            f"row; last: {exc.message}",
                        ) from exc
                    feedback.append(exc.feedback())
                    _observe_step(step_started)
                    continue
                parse_errors = 0
                if parsed.thought:
                    yield ipb.StageChange(stage="action", message=parsed.thought[:2000])
                async with contextlib.aclosing(
                    self._perform(parsed, image_b64, mime, feedback)
                ) as outputs:
                    async for output in outputs:
                        yield output
                _observe_step(step_started)
                if self.settings.settle_seconds > 0:
                    await anyio.sleep(self.settings.settle_seconds)
        except _Outcome as done:
            outcome = done
        if outcome is not None:
            if self.release_pending:
                await self._release_brokered()
            if outcome.outcome == ipb.SESSION_OUTCOME_SUCCESS and outcome.result:
                yield ipb.ContentChunk(text=outcome.result, is_finish=True)
            yield ipb.FinalResult(
                outcome=outcome.outcome, result=outcome.result, message=outcome.message
            )

    async def aclose_cleanup(self) -> None:
        """Destroy the sandbox if asked and not done yet (after an error or a stop)."""
        if not self.release_pending:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            if self.ctx.stop_requested:
                await self._release_after_stop()
            else:
                await self._release_brokered()

    # --- pieces ---

    def _check_deadline(self) -> None:
        if self.remaining() <= 0:
            raise _Outcome(
                ipb.SESSION_OUTCOME_FAILURE,
                "",
                f"timed out after {self.steps_done} steps (taskTimeout reached)",
            )

    async def _call(self, tool: str, **arguments: Any) -> Any:
        return await self.ctx.call_tool(tool, **arguments)

    async def _acquire(self) -> None:
        ctx = self.ctx
        sandbox_id = ctx.sandbox.id if ctx.sandbox is not None else ""
        shape = (ctx.sandbox.shapeName if ctx.sandbox is not None else "") or self.settings.shape
        life = int(min(86_400, max(60, self.remaining() + 300)))
        got = await self._call(
            "computer.sandbox_acquire",
            sandbox_id=sandbox_id,
            shape=shape,
            max_life_seconds=life,
        )
        if not isinstance(got, dict) or not got.get("sandbox_id"):
            raise ToolExecutionError(
                f"computer.sandbox_acquire answered {str(got)[:200]!r}",
                tool_name="computer.sandbox_acquire",
            )
        self.sandbox_id = str(got["sandbox_id"])
        self.release_pending = ctx.destroy_sandbox
        self.screen = ScreenSize(int(got["width"]), int(got["height"]))

    async def _release_brokered(self) -> None:
        try:
            await self._call("computer.sandbox_release", sandbox_id=self.sandbox_id)
            self.release_pending = False
        except ToolError as exc:
            _log.warning("could not destroy sandbox %s: %s", self.sandbox_id, exc.message)

    async def _release_after_stop(self) -> None:
        """The one sandbox operation not brokered: the dispatcher refuses the tool
        calls of a stopped session (see :class:`GuiPlanner`)."""
        local = self.planner.local_tools
        if local is None:
            _log.warning(
                "sandbox %s not destroyed after the stop (no in-process provider); "
                "its maxLifeSeconds ends it",
                self.sandbox_id,
            )
            return
        try:
            await local.release(self.sandbox_id)
            self.release_pending = False
        except Exception:
            _log.warning("could not destroy sandbox %s", self.sandbox_id, exc_info=True)

    def _take_screenshot(self, shot: Any) -> tuple[str, str]:
        if not isinstance(shot, dict) or not isinstance(shot.get("image_base64"), str):
            raise ToolError(
                "computer.screenshot returned no image", tool_name="computer.screenshot"
            )
        try:
            self.screen = ScreenSize(int(shot["width"]), int(shot["height"]))
        except (KeyError, TypeError, ValueError):
            pass
        image = shot["image_base64"]
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ToolError("computer.screenshot returned bad base64") from exc
        return image, str(shot.get("mime_type") or "image/png")

    async def _describe(self, step: int) -> str:
        """The text observation of ``step`` (``computer.describe_screen``), or why there is none."""
        try:
            got = await self._call("computer.describe_screen", sandbox_id=self.sandbox_id)
        except ToolError as exc:
            return f"Step {step}. The screen could not be described: {exc.message}"
        text = got.get("text") if isinstance(got, dict) else None
        if not isinstance(text, str):
            return f"Step {step}. The screen could not be described."
        return f"Step {step}. {text[:4000]}"

    def _start_conversation(self) -> None:
        ctx = self.ctx
        # The GUI prompt is the first user turn (as UI-TARS is trained);
        # the client's user_system_prompt is the system message.
        system = ctx.system_prompt(None)
        if system:
            self.messages.append({"role": "system", "content": system})
        for turn in ctx.history:
            role = turn.role if turn.role in ("user", "assistant") else "user"
            self.messages.append({"role": role, "content": turn.content})
        if self.output_format == "json":
            prompt = JSON_PROMPT.replace("{instruction}", ctx.instruction)
        elif self.output_format == "ui-tars":
            prompt = UITARS_PROMPT.replace("{instruction}", ctx.instruction)
        else:
            prompt = PYAUTOGUI_PROMPT.format(
                width=self.screen.width, height=self.screen.height, instruction=ctx.instruction
            )
        self.messages.append({"role": "user", "content": prompt})

    def _usage(self, target: ModelTarget, reply: _Reply, *, steps: int) -> ipb.Usage:
        cost, currency = self.settings.prices.cost(
            target.model, reply.input_tokens, reply.output_tokens
        )
        return ipb.Usage(
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            cost=cost,
            currency=currency,
            steps=steps,
            model=target.model,
        )

    async def _perform(
        self, parsed: ParsedOutput, image_b64: str, mime: str, feedback: list[str]
    ) -> AsyncGenerator[PlannerOutput, None]:
        """Runs the step's actions in order; a failed one stops the rest of the step."""
        for action in parsed.actions:
            if isinstance(action, act.Finished):
                answer = action.message or parsed.thought
                raise _Outcome(
                    ipb.SESSION_OUTCOME_SUCCESS,
                    answer,
                    f"finished in {self.steps_done} steps, model {self.action_model.model}",
                )
            if isinstance(action, act.Failed):
                raise _Outcome(
                    ipb.SESSION_OUTCOME_FAILURE,
                    "",
                    f"the model gave up after {self.steps_done} steps: "
                    f"{action.message or parsed.thought or 'no reason given'}",
                )
            if isinstance(action, act.CallUser):
                yield ipb.StageChange(
                    stage="call_user",
                    message=parsed.thought or "the agent asks for your help; send a message",
                )
                text = await self._wait_for_user()
                feedback.append(f"The user says: {text}")
                return
            if isinstance(action, act.Screenshot):
                continue
            if self.grounding_model is not None and parsed.thought:
                async with contextlib.aclosing(
                    self._ground(action, parsed.thought, image_b64, mime)
                ) as grounded:
                    async for item in grounded:
                        if isinstance(item, _Grounded):
                            action = item.action
                        else:
                            yield item
            tool, arguments = self._tool_call(action)
            try:
                result = await self._call(tool, sandbox_id=self.sandbox_id, **arguments)
            except ToolError as exc:
                code = tool_error_code_name(exc.error_code).removeprefix("TOOL_ERROR_CODE_")
                feedback.append(
                    f"The action {tool} failed ({code}): {exc.message}. "
                    "Look at the new screenshot and decide again."
                )
                return
            if isinstance(result, dict) and isinstance(result.get("cursor"), dict):
                cur = result["cursor"]
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    self.cursor = (int(cur["x"]), int(cur["y"]))
            if self.output_format == "json":
                feedback.append(
                    f"Done: you {_describe_action(action)}. If the task is complete now, "
                    'answer with the action "finished"; do not repeat an action that is done.'
                )

    async def _wait_for_user(self) -> str:
        remaining = self.remaining()
        if remaining <= 0:
            self._check_deadline()
        try:
            with anyio.fail_after(remaining):
                message = await self.ctx.user_inputs.receive()
        except TimeoutError:
            raise _Outcome(
                ipb.SESSION_OUTCOME_FAILURE, "", "timed out waiting for the user (call_user)"
            ) from None
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise _Outcome(
                ipb.SESSION_OUTCOME_FAILURE, "", "the user did not answer (call_user)"
            ) from None
        return message.text

    def _absolute(self, point: act.Point) -> tuple[int, int]:
        if not point.relative:
            return point.x, point.y
        base = self.cursor or (self.screen.width // 2, self.screen.height // 2)
        x = min(max(0, base[0] + point.x), self.screen.width - 1)
        y = min(max(0, base[1] + point.y), self.screen.height - 1)
        return x, y

    def _tool_call(self, action: act.Action) -> tuple[str, dict[str, Any]]:
        """The ``computer.*`` tool and its arguments for one action."""
        match action:
            case act.MouseClick() | act.MouseDoubleClick() | act.MouseTripleClick():
                x, y = self._absolute(action.at)
                args: dict[str, Any] = {"x": x, "y": y}
                if action.hold_key:
                    args["hold_key"] = action.hold_key
                if isinstance(action, act.MouseClick) and action.button == act.MouseButton.RIGHT:
                    return "computer.right_click", args
                if isinstance(action, act.MouseClick) and action.button == act.MouseButton.MIDDLE:
                    return "computer.middle_click", args
                tool = {
                    act.MouseClick: "computer.click",
                    act.MouseDoubleClick: "computer.double_click",
                    act.MouseTripleClick: "computer.triple_click",
                }[type(action)]
                if action.button != act.MouseButton.LEFT:
                    args["button"] = {
                        act.MouseButton.RIGHT: "right",
                        act.MouseButton.MIDDLE: "middle",
                    }.get(action.button, "left")
                return tool, args
            case act.MouseMove():
                x, y = self._absolute(action.to)
                return "computer.move", {"x": x, "y": y}
            case act.MouseDrag():
                sx, sy = self._absolute(action.start)
                if action.end.relative:
                    ex = min(max(0, sx + action.end.x), self.screen.width - 1)
                    ey = min(max(0, sy + action.end.y), self.screen.height - 1)
                else:
                    ex, ey = action.end.x, action.end.y
                return "computer.drag", {"start_x": sx, "start_y": sy, "end_x": ex, "end_y": ey}
            case act.MouseScroll():
                x, y = self._absolute(action.at)
                return "computer.scroll", {
                    "x": x,
                    "y": y,
                    "down": action.step_vertical,
                    "right": action.step_horizontal,
                }
            case act.KeyboardType():
                return "computer.type", {
                    "text": action.content,
                    "submit_newlines": action.submit_newlines,
                }
            case act.KeyboardHotkey():
                args = {"keys": action.keys}
                if action.duration_ms is not None:
                    args["duration_ms"] = action.duration_ms
                return "computer.hotkey", args
            case act.KeyDown():
                return "computer.key_down", {"key": action.key}
            case act.KeyUp():
                return "computer.key_up", {"key": action.key}
            case act.Wait():
                return "computer.wait", {"duration_ms": action.duration_ms}
        raise ParseError(f"the action {action.type} cannot be performed here")

    async def _ground(
        self, action: act.Action, thought: str, image_b64: str, mime: str
    ) -> AsyncGenerator[PlannerOutput | _Grounded, None]:
        """NORMAL mode: the grounding model places the point of a one-point action."""
        if not isinstance(
            action, act.MouseClick | act.MouseDoubleClick | act.MouseTripleClick | act.MouseMove
        ):
            return
        target = self.grounding_model
        assert target is not None
        messages: list[dict[str, Any]] = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": GROUNDING_PROMPT.format(target=thought[:2000])},
                    {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{image_b64}"}},
                ],
            }
        ]
        reply = _Reply()
        async with contextlib.aclosing(
            self._model_turn(target, messages, reply, "grounding")
        ) as outputs:
            async for output in outputs:
                yield output
        yield self._usage(target, reply, steps=0)
        m = _GROUNDED_POINT.search(reply.text)
        if m is None:
            return  # keep the action model's own point
        numbers = [g for g in m.groups() if g is not None]
        try:
            x, y = to_screen(
                float(numbers[0]), float(numbers[1]), screen=self.screen, space=self.grounding_space
            )
        except ParseError:
            return
        point = act.Point(x, y)
        if isinstance(action, act.MouseMove):
            yield _Grounded(dataclasses.replace(action, to=point))
        else:
            yield _Grounded(dataclasses.replace(action, at=point))

    # --- the model ---

    def _timeout(self) -> openai.Timeout:
        read = max(1.0, min(self.settings.read_timeout, self.remaining()))
        return openai.Timeout(read, connect=min(read, self.settings.connect_timeout))

    async def _model_turn(
        self,
        target: ModelTarget,
        messages: list[dict[str, Any]],
        reply: _Reply,
        step_name: str,
    ) -> AsyncGenerator[PlannerOutput, None]:
        """One streamed model call (retried only before its first token); text → ``reply``."""
        self._check_deadline()
        client = await self.planner.clients.client(target)
        if self._described and messages is self.messages:
            keep = max(0, self.settings.history_descriptions)
            old = self._described[: len(self._described) - keep] if keep else self._described
            messages = list(messages)
            for index, short in old:
                messages[index] = {**messages[index], "content": short}
        request: dict[str, Any] = {
            "model": target.model,
            "messages": _shorten_images(messages, self.settings.history_images),
            "stream": True,
            "stream_options": {"include_usage": True},
            "timeout": self._timeout(),
            "extra_headers": _llm.request_headers(target),
        }
        if self.settings.temperature is not None:
            request["temperature"] = self.settings.temperature
        if self.settings.max_tokens is not None:
            request["max_tokens"] = self.settings.max_tokens
        if step_name != "grounding" and self.output_format == "json":
            if self.settings.response_format == "llama-cpp":
                # llama-cpp-python's server compiles the schema to a grammar.
                request["response_format"] = {"type": "json_object", "schema": JSON_ACTION_SCHEMA}
            elif self.settings.response_format == "json-schema":
                request["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "gui_action", "schema": JSON_ACTION_SCHEMA},
                }
        prompt_estimate = _llm.estimate_tokens(
            json.dumps([m for m in request["messages"] if isinstance(m.get("content"), str)])
        )
        async with contextlib.aclosing(
            self._stream(client, target, request, reply, step_name, prompt_estimate)
        ) as outputs:
            async for output in outputs:
                yield output

    async def _open(
        self, client: openai.AsyncOpenAI, target: ModelTarget, request: dict[str, Any]
    ) -> Any:
        """Opens the response stream; retried (tenacity) on connection errors, 429 and 5xx.

        Only the opening is retried: once a token has arrived, a retry would
        repeat it, so a failure mid-stream fails the step.
        """

        async def create() -> Any:
            return await client.chat.completions.create(**request)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, self.settings.model_attempts)),
            wait=wait_random_exponential(multiplier=0.5, max=8.0),
            retry=retry_if_exception(
                lambda e: isinstance(e, openai.OpenAIError) and _is_retryable(e)
            ),
            reraise=True,
        )
        try:
            return await retrying(create)
        except openai.OpenAIError as exc:
            raise _llm.model_error(exc, target) from exc

    async def _stream(
        self,
        client: openai.AsyncOpenAI,
        target: ModelTarget,
        request: dict[str, Any],
        reply: _Reply,
        step_name: str,
        prompt_estimate: int,
    ) -> AsyncGenerator[PlannerOutput, None]:
        stream: openai.AsyncStream[ChatCompletionChunk] | None = None
        usage_seen = False
        completed = False
        received = 0
        span = model_span(target.model, _llm.public_url(target.base_url))
        first_token = _llm.FirstToken(span, target.model, time.monotonic())
        try:
            created = await self._open(client, target, request)
            stream = cast("openai.AsyncStream[ChatCompletionChunk]", created)
            try:
                async for chunk in stream:
                    first_token.chunk()
                    received += 1
                    if chunk.usage is not None:
                        reply.input_tokens = chunk.usage.prompt_tokens
                        reply.output_tokens = chunk.usage.completion_tokens
                        usage_seen = True
                    if not chunk.choices:
                        continue
                    text = chunk.choices[0].delta.content
                    if text:
                        reply.pieces += 1
                        reply.text += text
                        yield ipb.ThoughtChain(step_name=step_name, delta=text)
            except openai.OpenAIError as exc:
                raise _llm.model_error(exc, target) from exc
            completed = received > 0
        finally:
            if stream is not None:
                await _llm.close_model_stream(stream, self.settings.close_timeout)
            if not usage_seen:
                reply.input_tokens = prompt_estimate
                reply.output_tokens = reply.pieces
            if stream is not None and not completed and reply.pieces:
                # Cut short (stop or error): the tokens spent so far still count.
                cost, currency = self.settings.prices.cost(
                    target.model, reply.input_tokens, reply.output_tokens
                )
                self.ctx.add_usage(
                    input_tokens=reply.input_tokens,
                    output_tokens=reply.output_tokens,
                    cost=cost,
                    currency=currency,
                    model=target.model,
                )
            span.set_attribute("gen_ai.usage.input_tokens", reply.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", reply.output_tokens)
            end_model_span(span, None, completed=completed)
        if received == 0:
            # Not an empty reply to parse: the server took nothing (see
            # _llm.empty_stream_error); once the stream is closed, the reason
            # fails the task.
            raise await _llm.empty_stream_error(client, target, request)


def _observe_step(started: float) -> None:
    """commander_step_duration_seconds{planner="gui"}: screenshot to the step's last action."""
    metrics = _metrics.current
    if metrics is not None:
        metrics.observe_step("gui", time.monotonic() - started)


@dataclasses.dataclass(frozen=True)
class _Grounded:
    action: act.Action
