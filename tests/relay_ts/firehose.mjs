// Reads {service, plcUrl, cursor, collection, dids, expect, timeoutMs} on stdin, runs the official
// @atproto/sync Firehose against `service` with its verification on (signatures and MST
// proofs of every commit: unauthenticatedCommits is false), and prints one JSON object:
// {events: [{did, seq, event, rkey, n}], errors: [string]}, once `expect` record events of
// `dids` arrived or `timeoutMs` passed.
import { Firehose } from '@atproto/sync'
import { IdResolver } from '@atproto/identity'

let input = ''
for await (const chunk of process.stdin) input += chunk
const { service, plcUrl, cursor, collection, dids, expect, timeoutMs } = JSON.parse(input)
const wanted = new Set(dids)

// The default fetch refuses loopback addresses; the local PLC is on one.
const idResolver = new IdResolver({ plcUrl, fetch: globalThis.fetch })
const events = []
const errors = []
let finish
const finished = new Promise((resolve) => (finish = resolve))
const firehose = new Firehose({
  idResolver,
  service,
  getCursor: () => cursor,
  filterCollections: [collection],
  excludeIdentity: true,
  excludeAccount: true,
  unauthenticatedCommits: false,
  handleEvent: (evt) => {
    const record = evt.event === 'create' || evt.event === 'update' || evt.event === 'delete'
    if (record && wanted.has(evt.did)) {
      events.push({ did: evt.did, seq: evt.seq, event: evt.event, rkey: evt.rkey, n: evt.record?.n })
      if (events.length >= expect) finish()
    }
  },
  onError: (err) => {
    errors.push(`${err}${err && err.cause ? `: ${err.cause}` : ''}`)
  },
})
firehose.start()
const timer = setTimeout(finish, timeoutMs)
await finished
clearTimeout(timer)
process.stdout.write(JSON.stringify({ events, errors }) + '\n', () => process.exit(0))
