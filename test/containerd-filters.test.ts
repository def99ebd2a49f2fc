/** containerd's filter syntax as the snapshotter's List understands it. */
import { expect } from 'chai';
import { type FieldLookup, matchAny, parseFilter } from '../daemon/snapshotter/filters.js';
import { isLayerdError } from '../common/errors.js';

const info = {
  name: 'default/7/sha256:abc', parent: 'default/3/sha256:def', kind: 'committed',
  labels: { 'containerd.io/snapshot.ref': 'sha256:abc', 'containerd.io/gc.root': 'x', team: 'a,b' } as Record<string, string>,
};
const lookup: FieldLookup = (path) => {
  switch (path[0]) {
    case 'name': return { value: info.name, present: true };
    case 'parent': return { value: info.parent, present: true };
    case 'kind': return { value: info.kind, present: true };
    case 'labels': {
      const v = info.labels[path.slice(1).join('.')];
      return v === undefined ? { value: '', present: false } : { value: v, present: true };
    }
    default: return { value: '', present: false };
  }
};
const matches = (...filters: string[]): boolean => matchAny(filters.map(parseFilter), lookup);

describe('containerd filters', () => {
  it('matches what containerd\'s metadata layer asks for the remote path', () => {
    expect(matches('labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/sha256:def"')).to.equal(true);
    expect(matches('labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/4/sha256:def"')).to.equal(false);
  });

  it('ORs filters, ANDs selectors, and understands presence, !=, regexps and quoting', () => {
    expect(matches('kind==active', 'kind==committed')).to.equal(true);
    expect(matches('kind==committed,name==nope')).to.equal(false);
    expect(matches()).to.equal(true);
    expect(matches('')).to.equal(true);
    expect(matches('labels."containerd.io/gc.root"')).to.equal(true);
    expect(matches('labels.absent')).to.equal(false);
    expect(matches('labels.absent!=x')).to.equal(true);
    expect(matches('kind!=committed')).to.equal(false);
    expect(matches('name~=^default/[0-9]+/sha256:')).to.equal(true);
    expect(matches('name~=/^other/')).to.equal(false);
    expect(matches('labels.team=="a,b"')).to.equal(true);
    expect(matches("labels.team=='a,b'")).to.equal(true);
    expect(matches(' kind == committed , parent ~= "def$" ')).to.equal(true);
    expect(matches('labels."containerd.io/snapshot.ref"=="sha256:\\x61bc"')).to.equal(true);
  });

  it('refuses malformed filters with EINVAL', () => {
    for (const bad of ['labels.containerd.io/gc.root', 'kind==', 'kind=="open', '==x', 'kind==a,', 'name~=(', 'kind=a']) {
      expect(() => parseFilter(bad), bad).to.throw().that.satisfies((e: unknown) => isLayerdError(e, 'EINVAL'));
    }
  });
});
