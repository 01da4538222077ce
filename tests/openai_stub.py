"""A small OpenAI-compatible streaming server on loopback, with faults on request, for testing
clients: a real aiohttp server in a thread of the test process.

Each completion streams `max_tokens` chunks `gap` seconds apart, then a usage chunk and
`[DONE]`. The prompt's first token id (or the first word of a text prompt, "fault:NAME")
chooses a fault: `error` (HTTP 503), `stall` (headers, then silence), `cut` (the connection
closes after two chunks), `malformed` (a chunk that is not JSON). The server records every
request body it received.
"""

from __future__ import annotations

import asyncio
import json
import threading

from aiohttp import web

FAULT_IDS = {1: "error", 2: "stall", 3: "cut", 4: "malformed"}


def _fault(body: dict) -> str | None:
    prompt = body.get("prompt")
    if prompt is None:  # chat
        prompt = body["messages"][-1]["content"]
    if isinstance(prompt, list) and prompt:
        return FAULT_IDS.get(prompt[0])
    if isinstance(prompt, str) and prompt.startswith("fault:"):
        return prompt.split()[0].removeprefix("fault:")
    return None


class StubServer:
    def __init__(self, gap: float = 0.002) -> None:
        self.gap = gap
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_get("/v1/models", self._models)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self.loop.run_forever()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub-model"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        fault = _fault(body)
        if fault == "error":
            return web.json_response({"error": "overloaded"}, status=503)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if fault == "stall":
            await self._closing.wait()  # silence until the server stops
            return response
        chat = "messages" in body
        n = int(body["max_tokens"])
        prompt = body.get("prompt")
        prompt_len = len(prompt) if isinstance(prompt, list) else len(str(prompt).split())
        for i in range(n):
            await asyncio.sleep(self.gap)
            if fault == "cut" and i == 2:
                request.transport.close()
                return response
            if fault == "malformed" and i == 1:
                await response.write(b"data: {not json\n\n")
                continue
            choice = {"index": 0, "delta": {"content": f"w{i} "}} if chat else {"text": f"w{i} "}
            await response.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": prompt_len, "completion_tokens": n}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    def __enter__(self) -> StubServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self._closing.set)
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
