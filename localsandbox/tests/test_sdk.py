"""The unmodified lybic SDK against the local sandbox server: every call it makes works.

Each test creates its own sandbox (a real Xvfb display) and deletes it.
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import anyio
import httpx
import pytest
from lybic import LybicAPIError, LybicClient, Sandbox, dto
from PIL import Image

from localsandbox.tests.harness import (
    API_KEY,
    ORG,
    ROOT,
    LocalServer,
    alive,
    changed_pixels,
    screenshot,
    settled_screenshot,
    xvfb_pids,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(server: LocalServer) -> AsyncIterator[LybicClient]:
    async with server.client() as c:
        yield c


@pytest.fixture
async def sandbox(client: LybicClient) -> AsyncIterator[str]:
    s = Sandbox(client)
    created = await s.create(name="test", shape="local-1024x768", maxLifeSeconds=600)
    try:
        yield created.id
    finally:
        await s.delete(created.id)


async def run(s: Sandbox, sid: str, *argv: str, stdin: bytes | None = None) -> tuple[int, str]:
    kwargs: dict[str, Any] = {"executable": argv[0], "args": list(argv[1:])}
    if stdin is not None:
        kwargs["stdinBase64"] = base64.b64encode(stdin).decode()
    r = await s.execute_process(sid, **kwargs)
    return r.exitCode, base64.b64decode(r.stdoutBase64).decode()


async def act(s: Sandbox, sid: str, action: Any, **kw: Any) -> dto.SandboxActionResponseDto:
    return await s.execute_sandbox_action(
        sid, data=dto.ExecuteSandboxActionDto(action=action, **kw)
    )


def px(v: int) -> Any:
    return dto.PixelLength(value=v)


async def start_xterm(s: Sandbox, sid: str, command: str) -> Image.Image:
    """Starts xterm at the top-left running ``command``; returns the screen once the
    window is mapped and drawn."""
    empty = await screenshot(s, sid)
    code, _ = await run(
        s,
        sid,
        "/bin/sh",
        "-c",
        f"xterm -geometry 80x24+0+0 -e sh -c '{command}' >/dev/null 2>&1 &",
    )
    assert code == 0
    with anyio.fail_after(20):
        while True:
            code, out = await run(s, sid, "xdotool", "search", "--onlyvisible", "--class", "xterm")
            if code == 0 and out.strip():
                break
            await anyio.sleep(0.1)
    return await settled_screenshot(s, sid, unlike=empty)


async def wait_for_file(s: Sandbox, sid: str, path: str, want: str) -> str:
    text = ""
    with anyio.move_on_after(15):
        while text != want:
            _, text = await run(s, sid, "/bin/cat", path)
            if text != want:
                await anyio.sleep(0.1)
    return text


# ---------------------------------------------------------------------- lifecycle


async def test_create_get_list_screenshot_delete(server: LocalServer, client: LybicClient) -> None:
    s = Sandbox(client)
    displays_before = len(xvfb_pids(server.state_dir))
    created = await s.create(name="life", shape="local-1280x720", maxLifeSeconds=600)
    try:
        assert created.id.startswith("SBX-")
        assert created.name == "life"
        assert created.shapeName == "local-1280x720"
        assert created.status == dto.SandboxStatus.RUNNING
        assert len(xvfb_pids(server.state_dir)) == displays_before + 1

        got = await s.get(created.id)
        assert got.sandbox.id == created.id
        assert got.sandbox.shape is not None and got.sandbox.shape.os == "Linux"
        assert got.connectDetails.roomId == created.id

        listed = await s.list()
        assert created.id in [item.id for item in listed]

        assert await s.get_status(created.id) == "RUNNING"
        await s.extend_life(created.id, 1200)

        url, image, b64 = await s.get_screenshot(created.id)
        assert url.startswith(server.endpoint + "/screenshots/")
        assert image.size == (1280, 720)
        assert base64.b64decode(b64)[:4] == b"RIFF"

        preview = await s.preview(created.id)
        assert preview.cursorPosition is not None
        assert (preview.cursorPosition.screenWidth, preview.cursorPosition.screenHeight) == (
            1280,
            720,
        )
    finally:
        await s.delete(created.id)
    assert created.id not in [item.id for item in await s.list()]
    assert len(xvfb_pids(server.state_dir)) == displays_before
    with pytest.raises(LybicAPIError) as info:
        await s.get(created.id)
    assert info.value.status_code == 404


async def test_shapes_size_the_display(client: LybicClient) -> None:
    s = Sandbox(client)
    shapes = await s.get_shapes()
    assert "local-1280x720" in [sh.name for sh in shapes]
    created = await s.create(name="small", shape="local-800x600")
    try:
        _, image, _ = await s.get_screenshot(created.id)
        assert image.size == (800, 600)
    finally:
        await s.delete(created.id)
    with pytest.raises(LybicAPIError) as info:
        await s.create(name="bad", shape="beijing-2c-4g-cpu")
    assert info.value.status_code == 400 and "unknown shape" in info.value.message


async def test_sandbox_expires_after_max_life(client: LybicClient) -> None:
    s = Sandbox(client)
    created = await s.create(name="short", shape="local-800x600", maxLifeSeconds=1)
    with anyio.fail_after(10):
        # Polling the API is the point here: expiry must show in what clients see.
        while created.id in [item.id for item in await s.list()]:  # noqa: ASYNC110
            await anyio.sleep(0.2)
    with pytest.raises(LybicAPIError) as info:
        await s.get(created.id)
    assert info.value.status_code == 404


# ---------------------------------------------------------------------- real input on a real window


async def test_typing_into_xterm_changes_the_window_and_the_file(
    client: LybicClient, sandbox: str
) -> None:
    s = Sandbox(client)
    before = await start_xterm(s, sandbox, 'cat > "$HOME/typed.txt"')

    r = await act(s, sandbox, dto.MouseClickAction(x=px(200), y=px(150), button=1))
    assert r.cursorPosition is not None and (r.cursorPosition.x, r.cursorPosition.y) == (200, 150)
    r = await act(
        s,
        sandbox,
        dto.KeyboardTypeAction(content="hello, local sandbox!\n", treatNewLineAsEnter=True),
    )
    assert r.screenShot is not None
    text = await wait_for_file(s, sandbox, "typed.txt", "hello, local sandbox!\n")
    assert text == "hello, local sandbox!\n"

    # Key down/up: shift held while "a" is pressed gives "A"; released, "b" stays "b".
    await act(s, sandbox, dto.KeyDownAction(key="shift"))
    await act(s, sandbox, dto.KeyboardHotkeyAction(keys="a"))
    await act(s, sandbox, dto.KeyUpAction(key="shift"))
    await act(s, sandbox, dto.KeyboardHotkeyAction(keys="b Return"))
    text = await wait_for_file(s, sandbox, "typed.txt", "hello, local sandbox!\nAb\n")
    assert text == "hello, local sandbox!\nAb\n"

    after = await settled_screenshot(s, sandbox, unlike=before)
    # The typed text is on screen: the xterm's area changed, visibly.
    assert changed_pixels(before, after, (0, 0, 500, 100)) > 100


async def test_scroll_moves_the_xterm_scrollback(client: LybicClient, sandbox: str) -> None:
    s = Sandbox(client)
    await start_xterm(s, sandbox, "seq 1 400; exec cat")
    # The output is printed: the screen holds still at the end of it.
    before = await settled_screenshot(s, sandbox)
    r = await act(
        s, sandbox, dto.MouseScrollAction(x=px(200), y=px(150), stepVertical=-5, stepHorizontal=0)
    )
    assert r.cursorPosition is not None and r.cursorPosition.x == 200
    up = await settled_screenshot(s, sandbox, unlike=before)
    assert changed_pixels(before, up, (0, 0, 480, 300)) > 100, "scrolling up showed nothing new"
    await act(
        s, sandbox, dto.MouseScrollAction(x=px(200), y=px(150), stepVertical=5, stepHorizontal=0)
    )
    down = await settled_screenshot(s, sandbox, unlike=up)
    assert changed_pixels(before, down, (0, 0, 480, 300)) < changed_pixels(
        before, up, (0, 0, 480, 300)
    )


async def test_pointer_actions_move_the_real_pointer(client: LybicClient, sandbox: str) -> None:
    s = Sandbox(client)

    async def where(action: Any) -> tuple[int, int]:
        r = await act(s, sandbox, action, includeScreenShot=False)
        assert r.screenShot is None and r.cursorPosition is not None
        return r.cursorPosition.x, r.cursorPosition.y

    assert await where(dto.MouseMoveAction(x=px(300), y=px(400))) == (300, 400)
    assert await where(dto.MouseMoveAction(x=px(-50), y=px(25), relative=True)) == (250, 425)
    half = dto.FractionalLength(numerator=1, denominator=2)
    assert await where(dto.MouseMoveAction(x=half, y=half)) == (512, 384)
    assert await where(dto.MouseDoubleClickAction(x=px(10), y=px(20), button=1)) == (10, 20)
    assert await where(dto.MouseTripleClickAction(x=px(11), y=px(21), button=1)) == (11, 21)
    assert await where(dto.MouseClickAction(x=px(12), y=px(22), button=2)) == (12, 22)
    drag = dto.MouseDragAction(startX=px(100), startY=px(100), endX=px(600), endY=px(500), button=1)
    assert await where(drag) == (600, 500)
    rel_drag = dto.MouseDragAction(
        startX=px(0),
        startY=px(0),
        endX=px(-100),
        endY=px(-50),
        button=1,
        startRelative=True,
        endRelative=True,
    )
    assert await where(rel_drag) == (500, 450)
    assert await where(dto.MouseMoveAction(x=px(5), y=px(5), holdKey="ctrl")) == (5, 5)

    start = time.monotonic()
    r = await act(s, sandbox, dto.WaitAction(duration=300), includeCursorPosition=False)
    assert time.monotonic() - start >= 0.3
    assert r.cursorPosition is None and r.screenShot is not None
    for noop in (
        dto.ScreenshotAction(),
        dto.FinishedAction(message="ok"),
        dto.FailedAction(),
        dto.ClientUserTakeoverAction(),
    ):
        r = await act(s, sandbox, noop)
        assert r.screenShot is not None and r.cursorPosition is not None


async def test_bad_actions_are_rejected_before_anything_happens(
    client: LybicClient, sandbox: str
) -> None:
    s = Sandbox(client)
    cases: list[tuple[Any, str]] = [
        (dto.MouseClickAction(x=px(5000), y=px(1), button=1), "outside the screen"),
        (dto.KeyboardHotkeyAction(keys="--clearmodifiers"), "key syntax"),
        (dto.KeyboardHotkeyAction(keys="ctrl+nosuchkey"), "unknown key name"),
        (
            {"type": "touch:tap", "x": {"type": "px", "value": 1}, "y": {"type": "px", "value": 1}},
            "mobile action",
        ),
        ({"type": "mouse:click", "x": {"type": "px", "value": 1}}, "Field required"),
    ]
    for action, says in cases:
        with pytest.raises(LybicAPIError) as info:
            await s.execute_sandbox_action(sandbox, data={"action": action})
        assert info.value.status_code == 400, (action, info.value)
        assert says in info.value.message


async def test_key_names_never_run_a_program(
    server: LocalServer, client: LybicClient, sandbox: str
) -> None:
    """xdotool chains commands: ``key a exec touch f`` presses a, then runs touch.
    Plain HTTP (any client, not only the SDK) with such a key name in every place
    a key goes is answered 400 before xdotool runs, and nothing is executed."""
    marker = f"pwned_{secrets.token_hex(4)}"
    # The server's working directory (relative paths) and an absolute path.
    paths = [ROOT / marker, Path("/tmp") / marker]
    xy = {"x": {"type": "px", "value": 5}, "y": {"type": "px", "value": 5}}
    actions: list[dict[str, Any]] = [
        {"type": "keyboard:hotkey", "keys": f"a exec touch {marker}"},
        {"type": "keyboard:hotkey", "keys": f"a exec touch /tmp/{marker}"},
        {"type": "keyboard:hotkey", "keys": f"a EXEC touch {marker}", "duration": 10},
        {"type": "key:down", "key": f"a+exec+touch+{marker}"},
        {"type": "key:up", "key": f"a+Exec+touch+{marker}"},
        {"type": "mouse:click", **xy, "button": 1, "holdKey": f"a+exec+touch+{marker}"},
        {"type": "mouse:move", **xy, "holdKey": f"shift+exec+touch+{marker}"},
    ]
    url = f"{server.endpoint}/api/orgs/{ORG}/sandboxes/{sandbox}/actions/execute"
    try:
        async with httpx.AsyncClient(headers={"x-api-key": API_KEY}, timeout=30) as http:
            for action in actions:
                r = await http.post(url, json={"action": action})
                assert r.status_code == 400, (action, r.status_code, r.text)
                assert r.json()["code"] == "BAD_REQUEST"
                assert "unknown key name 'exec'" in r.json()["message"].lower(), r.text
        # Typed text is text: xdotool `type` never reads its arguments as commands.
        s = Sandbox(client)
        await start_xterm(s, sandbox, 'cat > "$HOME/typed.txt"')
        await act(s, sandbox, dto.MouseClickAction(x=px(200), y=px(150), button=1))
        text = f"a exec touch {marker} --file x sleep 1\n"
        await act(s, sandbox, dto.KeyboardTypeAction(content=text, treatNewLineAsEnter=True))
        assert await wait_for_file(s, sandbox, "typed.txt", text) == text
        # Help, the keysym spelled like xdotool's help command, is a key press.
        await act(s, sandbox, dto.KeyboardHotkeyAction(keys="Help"))
        assert [p for p in paths if p.exists()] == []
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------- processes


async def test_execute_process(client: LybicClient, sandbox: str) -> None:
    s = Sandbox(client)
    code, out = await run(s, sandbox, "/bin/echo", "Hello", "World")
    assert (code, out) == (0, "Hello World\n")
    code, out = await run(
        s, sandbox, "python3", "-c", "import sys; print(sys.stdin.read()[::-1])", stdin=b"abc"
    )
    assert (code, out) == (0, "cba\n")
    r = await s.execute_process(sandbox, executable="/bin/sh", args=["-c", "echo err >&2; exit 3"])
    assert r.exitCode == 3 and base64.b64decode(r.stderrBase64) == b"err\n"
    code, out = await run(s, sandbox, "/bin/sh", "-c", 'pwd; echo "$HOME"; echo "$DISPLAY"')
    cwd, home, display = out.splitlines()
    assert cwd == home and home.endswith("/root/home/agent") and display.startswith(":")
    r = await s.execute_process(sandbox, executable="pwd", workingDirectory="/tmp")
    assert base64.b64decode(r.stdoutBase64).decode().strip().endswith("/root/tmp")
    # The server's own environment (its API key) does not leak into the sandbox.
    _, out = await run(s, sandbox, "/usr/bin/env")
    assert "LOCALSANDBOX_API_KEY" not in out

    with pytest.raises(LybicAPIError) as info:
        await s.execute_process(sandbox, executable="no-such-program-xyz")
    assert info.value.status_code == 400 and "not found" in info.value.message

    start = time.monotonic()
    r = await s.execute_process(sandbox, executable="/bin/sleep", args=["30"])
    assert time.monotonic() - start < 10
    assert r.exitCode != 0 and b"timeout" in base64.b64decode(r.stderrBase64)


async def test_process_started_in_background_does_not_block(
    client: LybicClient, sandbox: str
) -> None:
    s = Sandbox(client)
    start = time.monotonic()
    code, out = await run(s, sandbox, "/bin/sh", "-c", "sleep 60 & echo started")
    assert (code, out) == (0, "started\n")
    assert time.monotonic() - start < 2.5


# ---------------------------------------------------------------------- files


class _Store(BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        data = self.files.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def do_PUT(self) -> None:
        self.files[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_store() -> Iterator[tuple[str, dict[str, bytes]]]:
    _Store.files = {"/in.txt": b"from the web\n"}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Store)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", _Store.files
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


async def test_copy_files(
    client: LybicClient, sandbox: str, http_store: tuple[str, dict[str, bytes]]
) -> None:
    s = Sandbox(client)
    base, files = http_store
    await run(s, sandbox, "/bin/sh", "-c", 'printf data > "$HOME/a.txt"; ln -s /etc "$HOME/etc"')
    home = "/home/agent"
    r = await s.copy_files(
        sandbox,
        dto.SandboxFileCopyRequestDto(
            files=[
                dto.FileCopyItem(
                    id="copy",
                    src=dto.SandboxFileLocation(path=f"{home}/a.txt"),
                    dest=dto.SandboxFileLocation(path=f"{home}/sub/b.txt"),
                ),
                dto.FileCopyItem(
                    id="download",
                    src=dto.HttpGetLocation(url=f"{base}/in.txt"),
                    dest=dto.SandboxFileLocation(path="/tmp/in.txt"),
                ),
                dto.FileCopyItem(
                    id="upload",
                    src=dto.SandboxFileLocation(path=f"{home}/a.txt"),
                    dest=dto.HttpPutLocation(url=f"{base}/out.txt"),
                ),
                dto.FileCopyItem(
                    id="missing",
                    src=dto.SandboxFileLocation(path="/nope"),
                    dest=dto.SandboxFileLocation(path="/x"),
                ),
                dto.FileCopyItem(
                    id="escape",
                    src=dto.SandboxFileLocation(path=f"{home}/etc/passwd"),
                    dest=dto.SandboxFileLocation(path="/passwd"),
                ),
                dto.FileCopyItem(
                    id="404",
                    src=dto.HttpGetLocation(url=f"{base}/absent"),
                    dest=dto.SandboxFileLocation(path="/y"),
                ),
            ]
        ),
    )
    results = {x.id: x for x in r.results}
    assert results["copy"].success and results["download"].success and results["upload"].success
    assert not results["missing"].success and "no such file" in (results["missing"].error or "")
    assert not results["escape"].success and "outside" in (results["escape"].error or "")
    assert not results["404"].success and "404" in (results["404"].error or "")
    assert (await run(s, sandbox, "/bin/cat", "sub/b.txt"))[1] == "data"
    assert (await run(s, sandbox, "/bin/cat", "../../tmp/in.txt"))[1] == "from the web\n"
    assert files["/out.txt"] == b"data"


# ---------------------------------------------------------------------- auth and cleanup


async def test_wrong_api_key_or_org_is_refused(server: LocalServer) -> None:
    async with server.client(api_key="lysk-wrong") as c:
        with pytest.raises(LybicAPIError) as info:
            await Sandbox(c).list()
    assert info.value.status_code == 401 and info.value.code == "UNAUTHORIZED"
    async with server.client(org="ORG-someone-else") as c:
        with pytest.raises(LybicAPIError) as info:
            await Sandbox(c).create(name="x", shape="local-800x600")
    assert info.value.status_code == 403
    async with httpx.AsyncClient() as raw:
        r = await raw.get(f"{server.endpoint}/api/orgs/{ORG}/sandboxes")
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"
        r = await raw.get(f"{server.endpoint}/screenshots/not-a-token.webp")
        assert r.status_code == 404


async def test_delete_kills_the_sandbox_processes(server: LocalServer, client: LybicClient) -> None:
    s = Sandbox(client)
    created = await s.create(name="doomed", shape="local-800x600")
    _, out = await run(s, created.id, "/bin/sh", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!")
    pid = int(out)
    assert alive(pid)
    await s.delete(created.id)
    assert not alive(pid)
    assert not (server.state_dir / "sandboxes" / created.id).exists()
