import type { FastifyReply } from 'fastify';

/** An SSE comment this often keeps proxies from closing a quiet stream. */
const HEARTBEAT_MS = 15_000;

export interface EventStream {
  send(event: string, data: unknown): void;
  end(): void;
  onClose(fn: () => void): void;
}

/** Takes over the reply and turns it into a text/event-stream; ends with the connection or the server. */
export function openEventStream(reply: FastifyReply, streams: Set<EventStream>): EventStream {
  reply.hijack();
  const out = reply.raw;
  out.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no' });
  const closers: Array<() => void> = [];
  let open = true;
  const heartbeat = setInterval(() => out.write(': keep-alive\n\n'), HEARTBEAT_MS);
  const stream: EventStream = {
    send(event, data) {
      if (open) out.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
    },
    end() {
      if (!open) return;
      open = false;
      clearInterval(heartbeat);
      streams.delete(stream);
      for (const fn of closers) fn();
      out.end();
    },
    onClose(fn) {
      closers.push(fn);
    },
  };
  streams.add(stream);
  out.on('close', () => stream.end());
  return stream;
}
