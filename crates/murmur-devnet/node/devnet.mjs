// Runs one service of the local network: the official PLC directory or the official PDS.
//
//   node devnet.mjs plc --port P
//   node devnet.mjs pds --port P --plc URL --data DIR
//
// murmur-devnet starts one process per service so that a single PDS can be stopped and
// started again on the same data directory and port. Every server binds to 127.0.0.1 only.
// When the service is listening it prints one JSON line on stdout: {"ready":true,"url":...}.
// It exits when stdin closes (the Rust parent is gone, even after SIGKILL) or on SIGTERM/SIGINT.

import fs from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';

// Loopback only: express's app.listen(port) would bind every interface.
const listen = http.Server.prototype.listen;
http.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'number' && (args.length === 1 || typeof args[1] === 'function')) {
    args.splice(1, 0, '127.0.0.1');
  }
  return listen.apply(this, args);
};

const fail = (msg) => {
  process.stderr.write(`devnet.mjs: ${msg}\n`);
  process.exit(2);
};

const [kind, ...rest] = process.argv.slice(2);
const opts = {};
for (let i = 0; i < rest.length; i += 2) {
  if (!rest[i].startsWith('--') || rest[i + 1] === undefined) fail(`bad argument ${rest[i]}`);
  opts[rest[i].slice(2)] = rest[i + 1];
}
const port = Number(opts.port);
if (!Number.isInteger(port) || port <= 0) fail('--port must be a port number');

// dev-env's index also loads the AppView and Ozone (5 s, 300 MB per process); import only the
// module each service needs, by file (the package's exports map hides them).
const devEnv = (file) => import(new URL(`./node_modules/@atproto/dev-env/dist/${file}`, import.meta.url));

let server;
if (kind === 'plc') {
  const { TestPlc } = await devEnv('plc.js');
  server = await TestPlc.create({ port });
} else if (kind === 'pds') {
  if (!opts.plc || !opts.data) fail('pds needs --plc URL and --data DIR');
  const { TestPds } = await devEnv('pds.js');
  const { Secp256k1Keypair } = await import('@atproto/crypto');
  const data = path.resolve(opts.data);
  await fs.mkdir(path.join(data, 'blobs'), { recursive: true });
  // The PLC rotation key must survive a restart: the PDS signs its accounts' PLC operations with it.
  const keyFile = path.join(data, 'plc-rotation-key.hex');
  let rotationKey;
  try {
    rotationKey = (await fs.readFile(keyFile, 'utf8')).trim();
  } catch {
    const key = await Secp256k1Keypair.create({ exportable: true });
    rotationKey = Buffer.from(await key.export()).toString('hex');
    await fs.writeFile(keyFile, rotationKey, { mode: 0o600 });
  }
  server = await TestPds.create({
    port,
    hostname: 'localhost',
    didPlcUrl: opts.plc,
    dataDirectory: data,
    blobstoreDiskLocation: path.join(data, 'blobs'),
    plcRotationKeyK256PrivateKeyHex: rotationKey,
  });
} else {
  fail(`unknown service "${kind}" (expected plc or pds)`);
}

let closing = false;
const close = async (code) => {
  if (closing) return;
  closing = true;
  try {
    await server.close();
  } catch (err) {
    process.stderr.write(`devnet.mjs: close failed: ${err}\n`);
  }
  process.exit(code);
};
process.on('SIGTERM', () => close(0));
process.on('SIGINT', () => close(0));
process.stdin.on('end', () => close(0));
process.stdin.on('error', () => close(0));
process.stdin.resume();

process.stdout.write(JSON.stringify({ ready: true, kind, url: `http://localhost:${port}` }) + '\n');
