import { pino, type Logger } from 'pino';

/**
 * Structured logs (JSON lines on stderr). The CLI stays quiet unless FERRY_LOG_LEVEL asks for more,
 * so its stdout and stderr remain what qemu-img users expect; services default to info.
 */
export function createLogger(component: string, defaultLevel: 'warn' | 'info' = 'warn'): Logger {
  return pino(
    {
      name: 'ferry',
      level: process.env.FERRY_LOG_LEVEL ?? defaultLevel,
      base: { component, pid: process.pid },
      // Secrets never reach a log line, whatever a caller passes in.
      redact: { paths: ['password', '*.password', 'privateKey', '*.privateKey', 'token', '*.token', 'authorization', '*.authorization'], censor: '[redacted]' },
    },
    pino.destination(2),
  );
}
