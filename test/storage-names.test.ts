import { expect } from 'chai';
import { ErrorCodes, isLayerdError } from '../common/errors.js';
import { classifyWhiteout, normalizeTarPath } from '../storage/tarPaths.js';
import { parseImageRef, splitNameTag } from '../storage/references.js';
import { parseDigest } from '../storage/digest.js';

function code(fn: () => unknown): string | undefined {
  try { fn(); } catch (err) { return isLayerdError(err) ? err.code : 'not-layerd'; }
  return undefined;
}

describe('tar member names', () => {
  it('normalises ./ prefixes, slashes and dots', () => {
    expect(normalizeTarPath('./etc/passwd')).to.equal('etc/passwd');
    expect(normalizeTarPath('usr//share/./doc/')).to.equal('usr/share/doc');
    expect(normalizeTarPath('./')).to.equal('');
    expect(normalizeTarPath('opt/üñí code — x')).to.equal('opt/üñí code — x');
  });
  it('refuses traversal, absolute names, NUL and over-long names', () => {
    expect(code(() => normalizeTarPath('../x'))).to.equal(ErrorCodes.EBADTAR);
    expect(code(() => normalizeTarPath('a/../../x'))).to.equal(ErrorCodes.EBADTAR);
    expect(code(() => normalizeTarPath('a/..'))).to.equal(ErrorCodes.EBADTAR);
    expect(code(() => normalizeTarPath('/etc/passwd'))).to.equal(ErrorCodes.EBADTAR);
    expect(code(() => normalizeTarPath('a\0b'))).to.equal(ErrorCodes.EBADTAR);
    expect(code(() => normalizeTarPath('x'.repeat(256)))).to.equal(ErrorCodes.ELIMIT);
    expect(code(() => normalizeTarPath(('abc/'.repeat(1100))))).to.equal(ErrorCodes.ELIMIT);
  });
  it('classifies whiteouts, opaque markers and AUFS bookkeeping', () => {
    expect(classifyWhiteout('etc/.wh.motd')).to.deep.equal({ kind: 'whiteout', target: 'etc/motd' });
    expect(classifyWhiteout('.wh.top')).to.deep.equal({ kind: 'whiteout', target: 'top' });
    expect(classifyWhiteout('usr/share/doc/.wh..wh..opq')).to.deep.equal({ kind: 'opaque', dir: 'usr/share/doc' });
    expect(classifyWhiteout('.wh..wh.plnk')).to.deep.equal({ kind: 'meta' });
    expect(classifyWhiteout('etc/motd')).to.deep.equal({ kind: 'none' });
    expect(code(() => classifyWhiteout('etc/.wh.'))).to.equal(ErrorCodes.EBADTAR);
    expect(code(() => classifyWhiteout('etc/.wh...'))).to.equal(ErrorCodes.EBADTAR);
  });
});

describe('image references and digests', () => {
  it('parses NAME[:TAG], registries with ports, digests and prefixes', () => {
    expect(parseImageRef('debian')).to.deep.equal({ kind: 'tag', name: 'debian', tag: 'latest' });
    expect(parseImageRef('localhost:5000/corpus/debian-multi:l2')).to.deep.equal({ kind: 'tag', name: 'localhost:5000/corpus/debian-multi', tag: 'l2' });
    const d = `sha256:${'a'.repeat(64)}`;
    expect(parseImageRef(d)).to.deep.equal({ kind: 'digest', digest: d });
    expect(parseImageRef(`x/y@${d}`)).to.deep.equal({ kind: 'digest', digest: d, name: 'x/y' });
    expect(parseImageRef('sha256:abcd')).to.deep.equal({ kind: 'prefix', hex: 'abcd' });
    expect(parseImageRef('0123456789ab')).to.deep.equal({ kind: 'prefix', hex: '0123456789ab' });
  });
  it('refuses what is no reference', () => {
    for (const bad of ['UPPER', 'a b', 'x:', ':t', 'a/../b', 'x:' + 't'.repeat(200), 'x\0y']) {
      expect(code(() => splitNameTag(bad)), bad).to.equal(ErrorCodes.EINVAL);
    }
  });
  it('refuses malformed digests and other algorithms clearly', () => {
    expect(code(() => parseDigest('sha256:xyz'))).to.equal(ErrorCodes.EINVAL);
    expect(code(() => parseDigest('sha512:' + 'a'.repeat(128)))).to.equal(ErrorCodes.EUNSUPPORTED);
    expect(parseDigest('sha256:' + 'b'.repeat(64))).to.equal('sha256:' + 'b'.repeat(64));
  });
});
