"""Creates a desktop on the local sandbox server through the lybic SDK: an xterm
running ``cat > FILE`` (non-canonical: no Enter needed) with the keyboard
focus, so what is typed into it lands in FILE. Prints the sandbox id (the
stack uses it as LYBIC_PRECREATE_SID).

    LYBIC_API_ENDPOINT=http://127.0.0.1:PORT LYBIC_ORG_ID=… LYBIC_API_KEY=… \\
        python scripts/local_desktop.py OUT_FILE [SHAPE]
"""

from __future__ import annotations

import os
import shlex
import sys

import anyio
from lybic import LybicAuth, LybicClient, Sandbox


async def main(out: str, shape: str) -> None:
    auth = LybicAuth(
        org_id=os.environ["LYBIC_ORG_ID"],
        api_key=os.environ["LYBIC_API_KEY"],
        endpoint=os.environ["LYBIC_API_ENDPOINT"],
    )
    async with LybicClient(auth, max_retries=0) as client:
        sandboxes = Sandbox(client)
        sb = await sandboxes.create(name="stack-desktop", shape=shape, maxLifeSeconds=86_400)
        # -icanon: every typed character reaches the file at once, Enter or not.
        inner = shlex.quote(f"stty -icanon; cat > {shlex.quote(out)}")
        await sandboxes.execute_process(
            sb.id,
            executable="/bin/sh",
            args=[
                "-c",
                f"xterm -T terminal -geometry 80x24+0+0 -e sh -c {inner} >/dev/null 2>&1 &",
            ],
        )
        for _ in range(100):
            found = await sandboxes.execute_process(
                sb.id, executable="xdotool", args=["search", "--onlyvisible", "--class", "xterm"]
            )
            if found.exitCode == 0:
                break
            await anyio.sleep(0.1)
        else:
            raise SystemExit("the xterm did not appear")
        await anyio.sleep(0.5)
        # No window manager: give the xterm the keyboard focus explicitly.
        await sandboxes.execute_process(
            sb.id,
            executable="xdotool",
            args=["search", "--onlyvisible", "--class", "xterm", "windowfocus", "--sync"],
        )
        print(sb.id)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    anyio.run(main, sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else "local-1024x768")
