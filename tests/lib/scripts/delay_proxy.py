"""argv = delay_file, then PORT:HOST:TARGET_PORT ... : a TCP proxy on 127.0.0.1:PORT to
HOST:TARGET_PORT for each, that passes every byte on, in order, the number of seconds
the delay file holds later (one way; read again every 0.2 s, absent or empty: 0). An
etcd behind it answers each call that much later both ways, without netem (this kernel
has none) and without losing anything. Prints "ready" once it listens."""

import asyncio
import sys
import time
from pathlib import Path

delay_file = Path(sys.argv[1])
delay = 0.0


async def follow_delay() -> None:
    global delay
    while True:
        try:
            delay = float(delay_file.read_text().strip() or 0)
        except (OSError, ValueError):
            delay = 0.0
        await asyncio.sleep(0.2)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes read at t are written at t + delay; the queue keeps their order."""
    held: asyncio.Queue = asyncio.Queue()

    async def take() -> None:
        try:
            while data := await reader.read(65536):
                held.put_nowait((time.monotonic() + delay, data))
        except OSError:
            pass
        held.put_nowait((time.monotonic() + delay, b""))

    taker = asyncio.ensure_future(take())
    try:
        while True:
            due, data = await held.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        taker.cancel()
        writer.close()


def serve(host: str, port: int):
    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

    return connected


async def main() -> None:
    follower = asyncio.ensure_future(follow_delay())
    for spec in sys.argv[2:]:
        listen, host, port = spec.split(":")
        await asyncio.start_server(serve(host, int(port)), "127.0.0.1", int(listen))
    print("ready", flush=True)
    await follower  # runs until the process is stopped


asyncio.run(main())
