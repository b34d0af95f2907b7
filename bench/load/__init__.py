"""Load benchmark: concurrent clients through `fluxport serve` against the fal emulator, vs. direct.

The fal emulator (tests/emulators) runs in its own process with a fixed generation latency
(default 2.0 s, no queue time). For each step (default: 1 client, "unloaded", then 50, 200, 500
concurrent clients) the same closed-loop load runs twice, each client looping requests for
`--duration` seconds after a staggered start:

  direct    an httpx client speaking fal's queue protocol to the emulator the way fluxport's fal
            adapter does for an API call: submit, the SSE status stream until COMPLETED (without
            progress logs, as nobody follows the steps; polling if the stream cannot be opened),
            the result, the image download;
  fluxport  the openai SDK's AsyncOpenAI (or `--client httpx`: the same JSON with raw httpx)
            calling images.generate(model="flux.2-dev", size="512x512", provider fal) on a real
            `fluxport serve` subprocess pointed at the same emulator, with API keys on (the
            default) and a key made for the benchmark.

Both paths share one kept-alive connection pool per step: httpx over aiohttp's pool (what the
openai SDK offers as DefaultAioHttpClient; `--transport httpcore` for httpx's own), so that the
load generator stays cheap next to what it measures.

In the unloaded step it also measures one extra HTTP hop alone: the same client and pool calling
a no-op server on fluxport's own stack (uvicorn with uvloop and httptools, Starlette) that answers
at once with an answer shaped like fluxport's, one call every `--latency` seconds as the other
phases pace theirs. Every gateway adds at least that hop; it is printed with fluxport's own share
of the added latency (added - hop).

It prints, per step and path: completed requests, throughput, p50/p95/p99 latency, errors by kind
(429 with Retry-After counted apart, as deliberate; the client then waits Retry-After), the CPU
each process used, the client's event-loop lag, fluxport's peak RSS (children included); then
the added latency (fluxport - direct, per percentile), the throughput ratio, and the targets:

  zero errors beyond deliberate 429s with Retry-After; at 200 clients throughput >= 0.95 x direct
  and added p99 <= 100 ms; at 500 clients throughput >= 0.9 x direct; unloaded added p50 <= 2 ms;
  fluxport peak RSS <= 500 MiB.

    .venv/bin/python -m bench.load                      # 1, 50, 200, 500 clients, 20 s each
    .venv/bin/python -m bench.load --quick              # CI: 1 and 20 clients, 4 s each
    .venv/bin/python -m bench.load --steps 200 --duration 30 --profile /tmp/prof   # py-spy too
                                                        # (every thread, --threads, raw format)

Throughput counts the requests completed inside the measured window (after the staggered start,
before the clients stop), divided by its length; latencies are those of the successful requests
started inside it. The emulator's CDN renders each distinct image once (cached), standing for a
CDN serving a stored file. The exit status is 0 unless the benchmark itself failed (`--strict`:
also 1 when a target is missed).

The package: `servers` starts and measures the processes, `loadgen` drives the clients, `report`
prints the figures and the targets, `__main__` ties them together. History: bench/README.md.
"""
