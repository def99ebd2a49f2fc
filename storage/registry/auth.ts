/**
 * Registry authentication: HTTP Basic, and the token flow of the Docker
 * registry API (a 401 carrying `WWW-Authenticate: Bearer realm=..,
 * service=.., scope=..` → GET the realm with the service and scopes, using
 * the credentials as Basic auth if there are any → a token to send as
 * `Authorization: Bearer`). Tokens are kept per scope set for the life of
 * the client.
 */
import { type Credentials } from './config.js';
import { registryError } from './errors.js';

export interface Challenge {
  scheme: 'basic' | 'bearer';
  params: Record<string, string>;
}

/** Parse one `WWW-Authenticate` value (registries send one challenge). */
export function parseChallenge(header: string | undefined): Challenge | undefined {
  if (!header) return undefined;
  const m = /^\s*(\w+)\s*(.*)$/s.exec(header);
  if (!m) return undefined;
  const scheme = m[1]!.toLowerCase();
  if (scheme !== 'basic' && scheme !== 'bearer') return undefined;
  const params: Record<string, string> = {};
  const re = /([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))/g;
  for (let p = re.exec(m[2]!); p; p = re.exec(m[2]!)) params[p[1]!.toLowerCase()] = (p[2] ?? p[3] ?? '').replace(/\\(.)/g, '$1');
  return { scheme, params };
}

/** What the authorizer needs to fetch a token: a plain GET returning status + body. */
export type TokenFetcher = (url: string, headers: Record<string, string>) => Promise<{ status: number; body: Buffer }>;

export class Authorizer {
  private basic = false;
  private readonly tokens = new Map<string, string>();

  constructor(
    private readonly registry: string,
    private readonly credentials: Credentials | undefined,
    private readonly fetchToken: TokenFetcher,
  ) {}

  /** The Authorization header to send for `scopes`, if one is known. */
  headerFor(scopes: readonly string[]): string | undefined {
    const token = this.tokens.get(scopeKey(scopes));
    if (token) return `Bearer ${token}`;
    if (this.basic && this.credentials) return basicHeader(this.credentials);
    return undefined;
  }

  /**
   * Answer a 401: learn how to authenticate and return true if the request
   * is worth repeating. Throws `unauthorized` when it is not.
   */
  async answer(header: string | undefined, scopes: readonly string[], sentAuthorization: boolean, url: string): Promise<boolean> {
    const challenge = parseChallenge(header);
    const context = { registry: this.registry, url, status: 401 };
    if (!challenge) throw registryError('unauthorized', `registry ${this.registry}: 401 Unauthorized without a usable WWW-Authenticate challenge`, context);
    if (challenge.scheme === 'basic') {
      if (!this.credentials) throw registryError('unauthorized', `registry ${this.registry} requires a username and password (none configured)`, context);
      if (this.basic && sentAuthorization) throw registryError('unauthorized', `registry ${this.registry}: username or password rejected`, context);
      this.basic = true;
      return true;
    }
    const key = scopeKey(scopes);
    if (this.tokens.has(key) && sentAuthorization) {
      // A token we just used was refused: drop it and try one fresh token.
      this.tokens.delete(key);
    }
    const realm = challenge.params['realm'];
    if (!realm) throw registryError('unauthorized', `registry ${this.registry}: Bearer challenge without a realm`, context);
    const tokenUrl = new URL(realm);
    if (challenge.params['service']) tokenUrl.searchParams.set('service', challenge.params['service']);
    const wanted = scopes.length > 0 ? scopes : (challenge.params['scope'] ? challenge.params['scope'].split(' ') : []);
    for (const s of wanted) tokenUrl.searchParams.append('scope', s);
    const headers: Record<string, string> = {};
    if (this.credentials) headers['authorization'] = basicHeader(this.credentials);
    const reply = await this.fetchToken(tokenUrl.toString(), headers);
    if (reply.status === 401 || reply.status === 403) {
      throw registryError('unauthorized', `registry ${this.registry}: the token service ${tokenUrl.origin} refused ${this.credentials ? 'the configured credentials' : 'anonymous access'} (${reply.status})`, { ...context, status: reply.status });
    }
    if (reply.status !== 200) {
      throw registryError('server', `registry ${this.registry}: the token service ${tokenUrl.origin} answered ${reply.status}`, { ...context, status: reply.status });
    }
    let token: unknown;
    try {
      const parsed = JSON.parse(reply.body.toString()) as { token?: unknown; access_token?: unknown };
      token = parsed.token ?? parsed.access_token;
    } catch {
      token = undefined;
    }
    if (typeof token !== 'string' || token === '') {
      throw registryError('protocol', `registry ${this.registry}: the token service ${tokenUrl.origin} sent no token`, context);
    }
    if (this.tokens.get(key) === token && sentAuthorization) {
      throw registryError('denied', `registry ${this.registry}: access denied for ${wanted.join(' ')}`, context);
    }
    this.tokens.set(key, token);
    return true;
  }
}

function scopeKey(scopes: readonly string[]): string {
  return [...scopes].sort().join(' ');
}

function basicHeader(c: Credentials): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}`;
}

/** The token scope for pulling from, or pushing to, a repository. */
export function repositoryScope(repository: string, actions: 'pull' | 'pull,push'): string {
  return `repository:${repository}:${actions}`;
}
