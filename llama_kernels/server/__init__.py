"""The OpenAI-compatible front end over the engine: request protocol, HTTP app, async adapter,
metrics and the `serve` command. The HTTP modules need the `serve` extra (FastAPI, uvicorn) and are
imported only by `llama-kernels serve`."""
