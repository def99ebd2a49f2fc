import { expect } from 'chai';
import { ErrorCodes, isLayerdError } from '../common/errors.js';
import { type Descriptor } from '../storage/oci.js';
import { parsePlatform, selectPlatform } from '../storage/platform.js';

const d = (n: number, os: string, architecture: string, variant?: string): Descriptor => ({
  mediaType: 'application/vnd.oci.image.manifest.v1+json',
  digest: `sha256:${String(n).repeat(64).slice(0, 64)}`,
  size: 100,
  platform: variant ? { os, architecture, variant } : { os, architecture },
});

describe('platform selection from an index', () => {
  const index = [d(1, 'linux', 'arm', 'v6'), d(2, 'linux', 'arm64', 'v8'), d(3, 'linux', 'amd64'), d(4, 'windows', 'amd64'), d(5, 'linux', 'arm', 'v7')];

  it('matches os and architecture, normalising aliases and default variants', () => {
    expect(selectPlatform(index, parsePlatform('linux/amd64'), 'x').digest).to.equal(index[2]!.digest);
    expect(selectPlatform(index, parsePlatform('linux/x86_64'), 'x').digest).to.equal(index[2]!.digest);
    expect(selectPlatform(index, parsePlatform('linux/arm64'), 'x').digest).to.equal(index[1]!.digest);
    expect(selectPlatform(index, parsePlatform('linux/aarch64/v8'), 'x').digest).to.equal(index[1]!.digest);
    expect(selectPlatform(index, parsePlatform('windows/amd64'), 'x').digest).to.equal(index[3]!.digest);
  });
  it('prefers the exact variant, else the newest older compatible one', () => {
    expect(selectPlatform(index, parsePlatform('linux/arm/v7'), 'x').digest).to.equal(index[4]!.digest);
    expect(selectPlatform(index, parsePlatform('linux/arm/v8'), 'x').digest).to.equal(index[4]!.digest);
    expect(selectPlatform(index, parsePlatform('linux/arm/v6'), 'x').digest).to.equal(index[0]!.digest);
    // an amd64/v3 host runs plain amd64 images
    expect(selectPlatform(index, parsePlatform('linux/amd64/v3'), 'x').digest).to.equal(index[2]!.digest);
  });
  it('says what is available when nothing fits', () => {
    try {
      selectPlatform(index, parsePlatform('linux/s390x'), 'test index');
      expect.fail('should throw');
    } catch (err) {
      expect(isLayerdError(err, ErrorCodes.EPLATFORM)).to.equal(true);
      expect((err as Error).message).to.contain('linux/arm64/v8');
    }
  });
  it('refuses malformed platforms', () => {
    for (const bad of ['linux', 'linux/', 'a/b/c/d', '/amd64']) {
      expect(() => parsePlatform(bad), bad).to.throw(/invalid platform/);
    }
  });
});
