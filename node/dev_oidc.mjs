// A development OpenID Connect provider for one institution, built on the npm package
// oidc-provider. `parallex up` runs one per demo institution and the tests run them as the
// institutions' identity providers. Not for production: users and passwords come from the
// JSON settings file given as the only argument:
//
//   {"issuer": "http://127.0.0.1:9001", "port": 9001, "title": "North University",
//    "jwks": {"keys": [<private RSA JWK>]}, "cookie_keys": ["..."],
//    "clients": [{"client_id": "...", "client_secret": "...", "redirect_uris": ["..."]}],
//    "users": {"alice": {"password": "...", "claims": {"email": "...", "groups": ["..."]}}},
//    "ttl": {"IdToken": 3600, "AccessToken": 3600, "RefreshToken": 86400}}
//
// The listening port may differ from the issuer's (a test proxy can sit in front); it prints
// "OIDC_READY <issuer>" once it accepts connections.
import fs from 'node:fs';
import http from 'node:http';
import { URLSearchParams } from 'node:url';
import Provider from 'oidc-provider';

const settings = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const users = settings.users || {};
const escape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const provider = new Provider(settings.issuer, {
  clients: settings.clients.map((c) => ({
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...c,
  })),
  jwks: settings.jwks,
  cookies: { keys: settings.cookie_keys },
  pkce: { required: () => true },
  features: { devInteractions: { enabled: false } },
  scopes: ['openid', 'offline_access', 'profile', 'email', 'groups', 'entitlements'],
  claims: {
    openid: ['sub'],
    profile: ['preferred_username', 'name'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
    entitlements: ['eduperson_entitlement'],
  },
  // Put the requested claims in the id_token itself, as most institutional providers do.
  conformIdTokenClaims: false,
  ttl: { IdToken: 3600, AccessToken: 3600, RefreshToken: 86400, ...(settings.ttl || {}) },
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  findAccount: async (ctx, id) => (users[id] ? {
    accountId: id,
    claims: async () => ({ sub: id, preferred_username: id, ...users[id].claims }),
  } : undefined),
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  // First-party client: consent is given with the login (no consent page).
  loadExistingGrant: async (ctx) => {
    const clientId = ctx.oidc.client.clientId;
    const existing = ctx.oidc.session.grantIdFor(clientId);
    if (existing) return ctx.oidc.provider.Grant.find(existing);
    const grant = new ctx.oidc.provider.Grant({ clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid offline_access profile email groups entitlements');
    await grant.save();
    ctx.oidc.session.grantIdFor(clientId, grant.jti);
    return grant;
  },
});
// Plain http on 127.0.0.1 in development; the provider refuses http issuers only in production.
provider.proxy = true;

function loginPage(uid, title, error) {
  return `<!doctype html><html><head><title>${escape(title)} sign-in</title></head><body>
<h1>${escape(title)}</h1><p>Development identity provider — demo accounts only.</p>
${error ? `<p id="error" style="color:#b00">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}/login">
<label>Username <input name="username" autofocus></label>
<label>Password <input name="password" type="password"></label>
<button type="submit">Sign in</button></form></body></html>`;
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return Object.fromEntries(new URLSearchParams(body));
}

const callback = provider.callback();
const server = http.createServer(async (req, res) => {
  const match = req.url.match(/^\/interaction\/([^/?]+)(\/login)?/);
  if (!match) return callback(req, res);
  try {
    const details = await provider.interactionDetails(req, res);
    if (req.method === 'POST' && match[2]) {
      const form = await readForm(req);
      const user = users[form.username];
      if (!user || user.password !== form.password) {
        res.writeHead(401, { 'content-type': 'text/html' });
        return res.end(loginPage(details.uid, settings.title, 'Unknown user or wrong password.'));
      }
      return provider.interactionFinished(req, res, { login: { accountId: form.username } },
        { mergeWithLastSubmission: false });
    }
    if (details.prompt.name === 'consent') {
      return provider.interactionFinished(req, res, { consent: {} },
        { mergeWithLastSubmission: true });
    }
    res.writeHead(200, { 'content-type': 'text/html' });
    return res.end(loginPage(details.uid, settings.title, ''));
  } catch (err) {
    res.writeHead(400, { 'content-type': 'text/plain' });
    return res.end(`interaction failed: ${err.message}`);
  }
});

server.listen(settings.port, '127.0.0.1', () => {
  console.log(`OIDC_READY ${settings.issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
