/** HTTP servers of tests and benchmarks listen on loopback only, on a port the kernel picks. */
import type { Server } from 'node:http';

export interface LoopbackListener {
  /** `127.0.0.1:<port>`, as a registry reference's host part. */
  host: string;
  port: number;
  /** Stops listening and ends every open connection (a kept-alive one would hold `close` up). */
  close(): Promise<void>;
}

export async function listenLoopback(server: Server): Promise<LoopbackListener> {
  server.keepAliveTimeout = 1000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    host: `127.0.0.1:${port}`,
    port,
    close: () => new Promise<void>((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
  };
}
