// A real OAuth2 authorization server for pop3proxy's tests: oidc-provider, in memory.
//
// Usage: node server.js PORT   (prints "oidc listening on PORT" when ready)
// Environment: OIDC_ACCESS_TTL (seconds, default 3600), OIDC_SERVICE_USER (the mailbox the
// client-credentials client "service" may read), OIDC_DOVECOT_SECRET, OIDC_SERVICE_SECRET,
// OIDC_JWT_KEY (when set: access tokens are JWTs signed HS256 with this key, for a resource server
// that validates them locally, without asking this server).
//
// The end user's side of a login (the browser) is automated: every interaction signs in the
// account named by login_hint (default "alice") and grants the scopes asked for, so a test drives
// the device and authorization-code flows with plain HTTP requests.
import { Provider } from 'oidc-provider';

const port = Number(process.argv[2] || 0);
const issuer = `http://127.0.0.1:${port}`;
const accessTtl = Number(process.env.OIDC_ACCESS_TTL || 3600);
const serviceUser = process.env.OIDC_SERVICE_USER || 'service-mailbox';

const clients = [
  {
    // A public native client, like a desktop mail program: device flow and code + PKCE.
    client_id: 'pop3proxy',
    token_endpoint_auth_method: 'none',
    application_type: 'native',
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback'],
  },
  {
    // A confidential client with a secret: code + PKCE, refresh.
    client_id: 'confidential',
    client_secret: process.env.OIDC_CONFIDENTIAL_SECRET || 'confidential-secret',
    application_type: 'native',
    grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback'],
  },
  {
    // A service principal: client-credentials grant only.
    client_id: 'service',
    client_secret: process.env.OIDC_SERVICE_SECRET || 'service-secret',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
  },
  {
    // The resource server (Dovecot) introspecting tokens.
    client_id: 'dovecot',
    client_secret: process.env.OIDC_DOVECOT_SECRET || 'dovecot-secret',
    grant_types: [],
    response_types: [],
    redirect_uris: [],
  },
];

const configuration = {
  clients,
  scopes: ['openid', 'offline_access', 'pop3'],
  cookies: { keys: ['pop3proxy-test-cookie-key'] },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    introspection: { enabled: true, allowedPolicy: async () => true },
    revocation: { enabled: true },
    ...(process.env.OIDC_JWT_KEY ? {
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => 'urn:pop3proxy:test',
        useGrantedResource: async () => true,
        getResourceServerInfo: async () => ({
          scope: 'pop3',
          accessTokenTTL: accessTtl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'HS256', key: Buffer.from(process.env.OIDC_JWT_KEY) } },
        }),
      },
    } : {}),
  },
  ttl: {
    AccessToken: accessTtl,
    ClientCredentials: accessTtl,
    DeviceCode: 600,
    RefreshToken: 14 * 24 * 3600,
    Grant: 14 * 24 * 3600,
    Interaction: 600,
    Session: 3600,
    IdToken: 3600,
  },
  // Dovecot 2.3 accepts only typ "JWT" (not RFC 9068's "at+jwt").
  formats: { customizers: { jwt: async (ctx, token, jwt) => { jwt.header = { typ: 'JWT' }; } } },
  // Refresh tokens whenever the client may use them (no consent prompt for offline_access).
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Dovecot reads the mailbox name from the introspection answer's "username".
  extraTokenClaims: async (ctx, token) => ({
    username: token.accountId || (token.clientId === 'service' ? serviceUser : undefined),
  }),
  async findAccount(ctx, sub) {
    return { accountId: sub, async claims() { return { sub }; } };
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
};

const provider = new Provider(issuer, configuration);

// Device flow clients poll every second here (RFC 8628's default, without an interval, is 5 s).
provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/device/auth' && ctx.body && typeof ctx.body === 'object' && ctx.body.device_code) {
    ctx.body.interval = 1;
  }
});

// The automated end user: sign in and grant what was asked.
provider.use(async (ctx, next) => {
  const match = ctx.path.match(/^\/interaction\/([^/]+)$/);
  if (!match || ctx.method !== 'GET') return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const accountId = details.params.login_hint || ctx.cookies.get('test_login_hint') || 'alice';
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId, clientId: details.params.client_id });
  grant.addOIDCScope(String(details.params.scope || ''));
  const missing = details.prompt.details.missingResourceScopes || {};
  for (const [indicator, scopes] of Object.entries(missing)) grant.addResourceScope(indicator, scopes.join(' '));
  const grantId = await grant.save();
  const url = await provider.interactionResult(ctx.req, ctx.res, {
    login: { accountId },
    consent: { grantId },
  }, { mergeWithLastSubmission: false });
  ctx.redirect(url);
});

// One line per token granted (tests count the refreshes): "grant <grant_type> <milliseconds since the epoch>".
provider.on('grant.success', (ctx) => {
  console.log(`grant ${ctx.oidc.params.grant_type} ${Date.now()}`);
});

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc listening on ${server.address().port}`);
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
