#!/usr/bin/env python3
"""A minimal billing API for the benchmark: asyncio, HTTP/1.1 keep-alive.

Answers every POST with a fixed 200 JSON after --delay-ms (the 100 ms API
of the benchmark), and with --arrivals FILE appends "<id> <unix time>" for
each request as it arrives (the INSERT-to-call latency measurement). It
parses just enough HTTP for libcurl's requests: it is no test fake (see
tests/fake_api.py for the contract's behaviour), only a fast stand-in.

Prints "READY <port>" once listening.
"""

import argparse
import asyncio
import json
import re
import signal
import sys
import time

BODY = b'{"id":"ch_bench","object":"charge"}'
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
ID_RE = re.compile(rb'"(?:invoice|redemption)_id":\s*(\d+)')


async def handle(reader, writer, delay, arrivals):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:].strip())
            body = await reader.readexactly(length) if length else b""
            if arrivals is not None:
                m = ID_RE.search(body)
                arrivals.write(f"{m.group(1).decode() if m else '?'} {time.time():.6f}\n")
            if delay:
                await asyncio.sleep(delay)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, default=0)
    ap.add_argument("--arrivals")
    args = ap.parse_args()
    arrivals = open(args.arrivals, "a", buffering=1) if args.arrivals else None
    delay = args.delay_ms / 1000.0
    server = await asyncio.start_server(lambda r, w: handle(r, w, delay, arrivals),
                                        "127.0.0.1", args.port, backlog=4096)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
