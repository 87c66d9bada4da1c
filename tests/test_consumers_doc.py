"""docs/consumers.md's long-poll client, run as written against the broker's API.

The Python block of the guide's long-poll section is executed as it stands, and its
generator follows a grant while the test stores new tokens over it; the API is the daemon's
app on a real Unix socket (tests/test_watch.py's `served`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.tasks import Tasks
from tests.test_watch import ME, served

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "consumers.md"


def long_poll_client() -> dict[str, Any]:
    """The namespace the guide's first Python block defines, under its long-poll heading."""
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index("## Long-poll") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None, "the long-poll section has no Python block"
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), str(GUIDE), "exec"), namespace)  # noqa: S102 - the guide's code
    return namespace


async def test_the_guides_long_poll_client_yields_each_new_token_as_it_is_stored(
    tmp_path: Path, new_secret: Callable[[str], str]
) -> None:
    """The guide's `tokens()` yields the current token, then each token stored after it, in
    order, each time from a request the broker held until the new token was there."""
    client = long_poll_client()
    async with served(tmp_path) as api:
        stored = [new_secret("at")]
        await api.store("alice", stored[0])
        follow = client["tokens"](str(api.socket), "techniek/alice", wait=10)
        seen = [await asyncio.to_thread(next, follow)]
        tasks = Tasks()
        for _ in range(2):
            pending = tasks.spawn(asyncio.to_thread(next, follow), "the guide's client")
            await api.wait_held(1, ME)  # the client holds a request with the current tag
            stored.append(new_secret("at"))
            await api.store("alice", stored[-1], force=True)
            seen.append(await asyncio.wait_for(pending, 10))
        follow.close()
        assert seen == stored
