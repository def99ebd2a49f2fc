/**
 * The daemon speaks systemd's protocols itself: sd_notify datagrams to
 * $NOTIFY_SOCKET (a path or an abstract '@name') and journald's native
 * protocol. A real receiver (python3 on a Unix datagram socket, with the
 * sender's credentials from the kernel) checks what arrives and from whom.
 * test/systemd-service.itest.ts proves both against a real systemd.
 */
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { fstatSync } from 'node:fs';
import { JournalTransport, encodeJournalEntry, journalFieldName, journalFieldsOf, stderrIsJournal } from '../common/journal.js';
import { silentLogger } from '../common/log.js';
import { UnixDatagramSender } from '../common/sys/unixDatagram.js';
import { SystemdNotifier, statusLine } from '../daemon/systemd.js';
import { type RunningDaemon, http, startDaemon } from './support/daemon.js';
import { type DatagramReceiver, receiveDatagrams } from './support/datagramReceiver.js';
import { DEBIAN_MULTI, scratch } from './support/env.js';

/** journald's native format back into fields (a name may repeat). */
function parseJournalEntry(data: Buffer): Array<[string, string]> {
  const fields: Array<[string, string]> = [];
  let at = 0;
  while (at < data.length) {
    const lineEnd = data.indexOf(0x0a, at);
    const eq = data.indexOf(0x3d, at);
    if (eq !== -1 && eq < lineEnd) {
      fields.push([data.toString('utf8', at, eq), data.toString('utf8', eq + 1, lineEnd)]);
      at = lineEnd + 1;
      continue;
    }
    const name = data.toString('utf8', at, lineEnd);
    const length = Number(data.readBigUInt64LE(lineEnd + 1));
    const start = lineEnd + 9;
    fields.push([name, data.toString('utf8', start, start + length)]);
    expect(data[start + length], `newline after the binary-safe value of ${name}`).to.equal(0x0a);
    at = start + length + 1;
  }
  return fields;
}

function notifyFields(data: Buffer): Record<string, string> {
  return Object.fromEntries(data.toString().split('\n').filter((l) => l !== '').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]));
}

describe('systemd protocols spoken by the daemon itself', function () {
  this.timeout(120_000);
  let work: { dir: string; remove(): Promise<void> };
  const receivers: DatagramReceiver[] = [];
  const daemons: RunningDaemon[] = [];
  before(async () => { work = await scratch(); });
  afterEach(async () => {
    // Containers outlive a daemon's stop (a restarted daemon adopts them): remove them first, or
    // their mounts stay and the scratch directory cannot be removed.
    for (const d of daemons.splice(0)) {
      const listed = await http(d.socket, 'GET', '/v1/containers').catch(() => undefined);
      for (const c of listed?.status === 200 ? listed.json<{ id: string }[]>() : []) await http(d.socket, 'DELETE', `/v1/containers/${c.id}`);
      await d.stop();
    }
    for (const r of receivers.splice(0)) await r.stop();
  });
  after(async () => { await work?.remove(); });

  async function receiver(address: string): Promise<DatagramReceiver> {
    const r = await receiveDatagrams(address);
    receivers.push(r);
    return r;
  }

  it('notifies a socket given by path and one in the abstract namespace, from its own PID', async () => {
    for (const address of [join(work.dir, 'notify.sock'), `@layerd-test-${randomBytes(6).toString('hex')}`]) {
      const r = await receiver(address);
      const env: NodeJS.ProcessEnv = { NOTIFY_SOCKET: address };
      const notifier = SystemdNotifier.fromEnvironment(silentLogger(), env);
      expect(env, 'NOTIFY_SOCKET taken out of the environment children inherit').not.to.have.property('NOTIFY_SOCKET');
      notifier!.notify({ READY: '1', STATUS: 'two\nlines' });
      const got = await r.next(`READY=1 on ${address}`, () => true);
      expect(got.pid).to.equal(process.pid);
      expect(got.data.toString()).to.equal('READY=1\nSTATUS=two lines');
    }
  });

  it('has no notifier without NOTIFY_SOCKET, and refuses an address that is neither a path nor abstract', () => {
    expect(SystemdNotifier.fromEnvironment(silentLogger(), {})).to.equal(undefined);
    expect(SystemdNotifier.fromEnvironment(silentLogger(), { NOTIFY_SOCKET: 'vsock:2:1234' })).to.equal(undefined);
  });

  it('the daemon sends READY=1 only once its socket serves, with a STATUS of images, containers and mounts', async () => {
    const address = join(work.dir, 'daemon-notify.sock');
    const r = await receiver(address);
    const daemon = await startDaemon(join(work.dir, 'd1'), ['--mount-root', join(work.dir, 'd1', 'mounts')], { NOTIFY_SOCKET: address });
    daemons.push(daemon);
    const ready = await r.next('READY=1 from the daemon', (d) => notifyFields(d.data)['READY'] === '1');
    expect(ready.pid, 'sent by the daemon itself, not a helper').to.equal(daemon.pid);
    expect(notifyFields(ready.data)['STATUS']).to.equal(`serving ${daemon.socket}: 0 images, 0 containers, 0 mounts`);
    // READY=1 came after listen(): by the time it is received the socket answers.
    expect((await http(daemon.socket, 'GET', '/v1/health')).status).to.equal(200);

    const imported = await http(daemon.socket, 'POST', '/v1/images/import', JSON.stringify({ path: DEBIAN_MULTI }), { 'content-type': 'application/json' });
    expect(imported.status, imported.body).to.be.oneOf([200, 201]);
    const created = await http(daemon.socket, 'POST', '/v1/containers', JSON.stringify({ image: 'debian-multi:latest', id: 'c1' }), { 'content-type': 'application/json' });
    expect(created.status, created.body).to.be.oneOf([200, 201]);
    const images = (await http(daemon.socket, 'GET', '/v1/images')).json<unknown[]>().length;
    // A STATUS= sent while the create was under way may show the container without its mount
    // yet (true at that moment); the line after the create settles names both.
    const settled = statusLine(daemon.socket, { images, containers: 1, mounts: 1 });
    await r.next('a STATUS= with the container and its mount', (d) => notifyFields(d.data)['STATUS'] === settled);
    const removed = await http(daemon.socket, 'DELETE', '/v1/containers/c1');
    expect(removed.status, removed.body).to.equal(200);
    await r.next('a STATUS= without it', (d) => (notifyFields(d.data)['STATUS'] ?? '').includes('0 containers,'));
    expect(await daemon.stop()).to.equal(0);
    daemons.pop();
    await r.next('STOPPING=1', (d) => notifyFields(d.data)['STOPPING'] === '1');
  });

  it('encodes journal fields, binary-safe where a value has a newline', () => {
    expect(journalFieldName('container')).to.equal('CONTAINER');
    expect(journalFieldName('diffId')).to.equal('DIFF_ID');
    expect(journalFieldName('_private')).to.equal('PRIVATE');
    expect(journalFieldName('message')).to.equal('LAYERD_MESSAGE');
    expect(journalFieldName('--')).to.equal(undefined);
    const entry = encodeJournalEntry([['MESSAGE', 'one\ntwo'], ['PRIORITY', '4']]);
    expect(entry.equals(Buffer.concat([Buffer.from('MESSAGE\n'), Buffer.from([7, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('one\ntwo\nPRIORITY=4\n')]))).to.equal(true);
    expect(journalFieldsOf({ level: 'warn', message: 'm', container: 'c1', count: 3, timestamp: 't' }, 'layerd')).to.deep.equal([
      ['MESSAGE', 'm'], ['PRIORITY', '4'], ['SYSLOG_IDENTIFIER', 'layerd'], ['CONTAINER', 'c1'], ['COUNT', '3'],
    ]);
  });

  it('a journal transport sends each record as one datagram with priority and fields; refused ones fall back to JSON lines', async () => {
    const socket = join(work.dir, 'journal.sock');
    const r = await receiver(socket);
    const fallback: string[] = [];
    const transport = new JournalTransport({ identifier: 'layerd', socket, fallback: (line) => fallback.push(line) });
    const done = (): void => undefined;
    transport.log({ level: 'warn', message: 'the mount host died\nmounting again', container: 'c1', digest: 'sha256:ab' }, done);
    transport.log({ level: 'error', message: 'failed', error: 'EIO' }, done);
    const warning = parseJournalEntry((await r.next('the warning', (d) => d.data.includes('PRIORITY=4'))).data);
    expect(warning).to.deep.equal([
      ['MESSAGE', 'the mount host died\nmounting again'], ['PRIORITY', '4'], ['SYSLOG_IDENTIFIER', 'layerd'], ['CONTAINER', 'c1'], ['DIGEST', 'sha256:ab'],
    ]);
    expect(parseJournalEntry((await r.next('the error', (d) => d.data.includes('PRIORITY=3'))).data)).to.deep.include(['ERROR', 'EIO']);
    expect(fallback).to.deep.equal([]);
    transport.close();

    const gone = new JournalTransport({ identifier: 'layerd', socket: join(work.dir, 'nobody.sock'), fallback: (line) => fallback.push(line) });
    gone.log({ level: 'info', message: 'kept', container: 'c2' }, done);
    gone.close();
    expect(fallback.map((l) => JSON.parse(l) as unknown)).to.deep.equal([{ level: 'info', message: 'kept', container: 'c2' }]);
  });

  it('logs to journald only when stderr is the stream JOURNAL_STREAM names and the socket is there', async () => {
    const socket = join(work.dir, 'journal-detect.sock');
    await receiver(socket);
    const stderr = fstatSync(2);
    expect(stderrIsJournal({ JOURNAL_STREAM: `${stderr.dev}:${stderr.ino}` }, socket)).to.equal(true);
    // A child whose stderr was redirected (a mount host's log file) inherits the variable, not the stream.
    expect(stderrIsJournal({ JOURNAL_STREAM: `${stderr.dev}:${stderr.ino + 1}` }, socket)).to.equal(false);
    expect(stderrIsJournal({ JOURNAL_STREAM: `${stderr.dev}:${stderr.ino}` }, join(work.dir, 'none.sock'))).to.equal(false);
    expect(stderrIsJournal({}, socket)).to.equal(false);
  });

  it('a datagram too large for the socket is an EMSGSIZE error, not a partial send', async () => {
    const socket = join(work.dir, 'big.sock');
    await receiver(socket);
    const sender = new UnixDatagramSender();
    try {
      expect(() => sender.send(socket, Buffer.alloc(64 * 1024 * 1024))).to.throw(/EMSGSIZE/);
    } finally {
      sender.close();
    }
  });

  it('refuses socket addresses that do not fit sun_path', () => {
    const sender = new UnixDatagramSender();
    try {
      expect(() => sender.send('/' + 'x'.repeat(120), Buffer.from('x'))).to.throw(/EINVAL/);
      expect(() => sender.send('@', Buffer.from('x'))).to.throw(/EINVAL/);
    } finally {
      sender.close();
    }
  });

  it('statusLine counts in words', () => {
    expect(statusLine('/s', { images: 1, containers: 2, mounts: 0 })).to.equal('serving /s: 1 image, 2 containers, 0 mounts');
  });
});
