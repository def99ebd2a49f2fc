/**
 * A real receiving end for Unix datagram sockets (what systemd's notify
 * socket and journald's socket are), for tests: python3 binds the address
 * (a path, or '@name' in the abstract namespace), asks the kernel for each
 * sender's credentials (SO_PASSCRED) and prints every datagram with the
 * sender's PID. Node itself cannot receive Unix datagrams.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { stopChild } from './processes.js';
import { waitFor } from './daemon.js';

const RECEIVER = `
import base64, socket, struct, sys
address = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
s.bind('\\0' + address[1:] if address.startswith('@') else address)
print('ready', flush=True)
while True:
    data, ancillary, _, _ = s.recvmsg(1 << 20, socket.CMSG_SPACE(12))
    pid = 0
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack('iII', value[:12])[0]
    print(pid, base64.b64encode(data).decode(), flush=True)
`;

export interface Datagram {
  /** The sending process, as the kernel reports it. */
  pid: number;
  data: Buffer;
}

export interface DatagramReceiver {
  readonly messages: Datagram[];
  /** Wait (bounded) until a datagram satisfies `match`, and return it. */
  next(what: string, match: (d: Datagram) => boolean, timeoutMs?: number): Promise<Datagram>;
  stop(): Promise<void>;
}

export async function receiveDatagrams(address: string): Promise<DatagramReceiver> {
  const child: ChildProcess = spawn('python3', ['-c', RECEIVER, address], { stdio: ['ignore', 'pipe', 'pipe'] });
  const messages: Datagram[] = [];
  let ready = false;
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); });
  createInterface({ input: child.stdout! }).on('line', (line) => {
    if (line === 'ready') { ready = true; return; }
    const [pid, data] = line.split(' ');
    messages.push({ pid: Number(pid), data: Buffer.from(data ?? '', 'base64') });
  });
  const stop = async (): Promise<void> => { await stopChild(child, { what: 'datagram receiver' }); };
  try {
    await waitFor(`the datagram receiver on ${address}`, () => {
      if (child.exitCode !== null) throw new Error(`datagram receiver exited: ${stderr}`);
      return ready;
    }, 15_000);
  } catch (err) {
    await stop();
    throw err;
  }
  return {
    messages,
    stop,
    async next(what, match, timeoutMs = 15_000) {
      let found: Datagram | undefined;
      await waitFor(what, () => (found = messages.find(match)) !== undefined, timeoutMs);
      return found!;
    },
  };
}
