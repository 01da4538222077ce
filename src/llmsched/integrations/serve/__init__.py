"""llmsched over HTTP: an emulated engine (the simulator's engine on a real-time clock behind
vLLM's OpenAI API and metrics) and a gateway (llmsched's routers over real backends).
Needs the `serve` extra (FastAPI, uvicorn, aiohttp, prometheus-client)."""
