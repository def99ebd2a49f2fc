/**
 * Platforms and the choice of one manifest from an index ("fat manifest"):
 * match the os and architecture, then the best compatible variant, the way
 * containerd's platform matcher does.
 */
import { arch as hostArch } from 'node:process';
import { ErrorCodes, LayerdError } from '../common/errors.js';
import { type Descriptor, type Platform } from './oci.js';

export interface PlatformSpec {
  os: string;
  architecture: string;
  variant?: string;
}

const ARCH_ALIASES: Record<string, string> = {
  x86_64: 'amd64', 'x86-64': 'amd64', x64: 'amd64',
  aarch64: 'arm64', armhf: 'arm', armel: 'arm', i386: '386', ia32: '386',
};

/** Normalise as containerd does: aliases, arm64 → variant v8, arm → v7. */
export function normalizePlatform(p: PlatformSpec): PlatformSpec {
  const os = p.os.toLowerCase();
  const architecture = ARCH_ALIASES[p.architecture.toLowerCase()] ?? p.architecture.toLowerCase();
  let variant = p.variant?.toLowerCase();
  if (architecture === 'arm64' && (variant === undefined || variant === '8')) variant = 'v8';
  if (architecture === 'arm' && variant === undefined) variant = 'v7';
  if (architecture === 'arm' && variant !== undefined && /^\d$/.test(variant)) variant = `v${variant}`;
  if (architecture === 'amd64' && variant === 'v1') variant = undefined;
  return variant === undefined ? { os, architecture } : { os, architecture, variant };
}

export function parsePlatform(text: string): PlatformSpec {
  const parts = text.split('/');
  if (parts.length < 2 || parts.length > 3 || parts.some((s) => s === '')) {
    throw new LayerdError(ErrorCodes.EINVAL, `invalid platform '${text}': expected os/arch[/variant]`, { platform: text });
  }
  const [os, architecture, variant] = parts as [string, string, string | undefined];
  return normalizePlatform(variant === undefined ? { os, architecture } : { os, architecture, variant });
}

export function formatPlatform(p: PlatformSpec): string {
  return p.variant ? `${p.os}/${p.architecture}/${p.variant}` : `${p.os}/${p.architecture}`;
}

export function hostPlatform(): PlatformSpec {
  // layerd serves Linux containers; the host's CPU decides the architecture.
  return normalizePlatform({ os: 'linux', architecture: hostArch });
}

/**
 * How well `candidate` serves `wanted`: undefined if it cannot run there,
 * else a rank where lower is better (exact variant first, then older
 * compatible variants, newest first).
 */
function rank(wanted: PlatformSpec, candidate: Platform): number | undefined {
  const c = normalizePlatform({ os: candidate.os, architecture: candidate.architecture, ...(candidate.variant ? { variant: candidate.variant } : {}) });
  if (c.os !== wanted.os || c.architecture !== wanted.architecture) return undefined;
  if (c.variant === wanted.variant) return 0;
  const w = variantNumber(wanted.variant);
  const v = variantNumber(c.variant);
  // amd64 v2..v4 and arm v5..v8 are backward compatible: an older variant runs on a newer CPU.
  if (w !== undefined && v !== undefined && v < w) return 1 + (w - v);
  return undefined;
}

function variantNumber(variant: string | undefined): number | undefined {
  if (variant === undefined) return 1; // amd64 without a variant is v1
  const m = /^v(\d+)$/.exec(variant);
  return m ? Number(m[1]) : undefined;
}

/** The descriptor of `manifests` that best serves `wanted`, in index order on ties. */
export function selectPlatform(manifests: readonly Descriptor[], wanted: PlatformSpec, what: string): Descriptor {
  let best: { desc: Descriptor; rank: number } | undefined;
  for (const desc of manifests) {
    if (!desc.platform) continue;
    const r = rank(wanted, desc.platform);
    if (r !== undefined && (best === undefined || r < best.rank)) best = { desc, rank: r };
  }
  if (!best) {
    const available = manifests.filter((d) => d.platform).map((d) => formatPlatform(normalizePlatform(d.platform!)));
    throw new LayerdError(
      ErrorCodes.EPLATFORM,
      `${what}: no manifest for platform ${formatPlatform(wanted)} (available: ${available.join(', ') || 'none'})`,
      { platform: formatPlatform(wanted), available: available.join(',') },
    );
  }
  return best.desc;
}
