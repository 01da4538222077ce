"""The load client, `llmsched bench`: a workload sent to any OpenAI-compatible server and
measured as `vllm bench serve` measures it (needs the `bench` extra: aiohttp)."""
