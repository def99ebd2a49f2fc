/** PAX time records: parsing and formatting, negative times included. */
import { expect } from 'chai';
import { formatPaxTime, parsePaxTime } from '../storage/paxTime.js';

describe('PAX times', () => {
  it('parses whole and fractional seconds, rounding down before 1970', () => {
    expect(parsePaxTime('1700000000')).to.deep.equal({ sec: 1700000000, nsec: 0 });
    expect(parsePaxTime('1700000000.123456789')).to.deep.equal({ sec: 1700000000, nsec: 123456789 });
    expect(parsePaxTime('1700000000.5')).to.deep.equal({ sec: 1700000000, nsec: 500000000 });
    expect(parsePaxTime('1700000000.')).to.deep.equal({ sec: 1700000000, nsec: 0 });
    expect(parsePaxTime('1.0000000019')).to.deep.equal({ sec: 1, nsec: 1 });
    expect(parsePaxTime('-1.25')).to.deep.equal({ sec: -2, nsec: 750000000 });
    expect(parsePaxTime('-0.000000001')).to.deep.equal({ sec: -1, nsec: 999999999 });
    expect(parsePaxTime('-0.0000000001')).to.deep.equal({ sec: -1, nsec: 999999999 });
    expect(parsePaxTime('-5')).to.deep.equal({ sec: -5, nsec: 0 });
    expect(parsePaxTime('-0')).to.deep.equal({ sec: 0, nsec: 0 });
    expect(parsePaxTime('-31536000.999999999')).to.deep.equal({ sec: -31536001, nsec: 1 });
  });

  it('refuses what is not a time', () => {
    for (const bad of ['', 'x', '1e9', '1.2.3', '+1', '0x10', '99999999999999999999']) {
      expect(parsePaxTime(bad), bad).to.equal(undefined);
    }
  });

  it('formats the exact fraction, and nothing more for whole seconds', () => {
    expect(formatPaxTime(1700000000)).to.equal('1700000000');
    expect(formatPaxTime(-5)).to.equal('-5');
    expect(formatPaxTime(1700000000, 123456789)).to.equal('1700000000.123456789');
    expect(formatPaxTime(1700000000, 5)).to.equal('1700000000.000000005');
    expect(formatPaxTime(1700000000, 500000000)).to.equal('1700000000.5');
    expect(formatPaxTime(-2, 750000000)).to.equal('-1.25');
    expect(formatPaxTime(-1, 999999999)).to.equal('-0.000000001');
  });

  it('round-trips', () => {
    for (const [sec, nsec] of [[0, 1], [-1, 1], [-1, 999999999], [2 ** 33, 999999999], [-31536001, 1], [1700000000, 120000000]] as const) {
      expect(parsePaxTime(formatPaxTime(sec, nsec))).to.deep.equal({ sec, nsec });
    }
  });
});
