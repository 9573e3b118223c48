// Reads {url, cursor, collections, dids, expect, timeoutMs} on stdin and subscribes with
// @atcute/jetstream (it opens with requireHello=true and sends its filters as the hello
// options_update, and checks every event against its own schema of Jetstream's events:
// validateEvents). Prints {events: [{did, kind, time_us, operation, collection, rkey, cid, n}],
// errors: [string]} once `expect` commit events arrived or `timeoutMs` passed.
import { JetstreamSubscription } from '@atcute/jetstream'

let input = ''
for await (const chunk of process.stdin) input += chunk
const { url, cursor, collections, dids, expect, timeoutMs } = JSON.parse(input)

const events = []
const errors = []
const subscription = new JetstreamSubscription({
  url,
  cursor,
  wantedCollections: collections,
  wantedDids: dids,
  validateEvents: true,
  onError: (err) => errors.push(`invalid event: ${err}`),
  onConnectionError: (ev) => errors.push(`connection error: ${ev?.message ?? ev}`),
})

const timer = setTimeout(() => finish(), timeoutMs)
let done = false
function finish() {
  if (done) return
  done = true
  clearTimeout(timer)
  process.stdout.write(JSON.stringify({ events, errors }) + '\n', () => process.exit(0))
}
for await (const event of subscription) {
  const c = event.commit
  events.push({
    did: event.did,
    kind: event.kind,
    time_us: event.time_us,
    operation: c?.operation,
    collection: c?.collection,
    rkey: c?.rkey,
    cid: c?.cid,
    n: c?.record?.n,
  })
  if (events.filter((e) => e.kind === 'commit').length >= expect) break
}
finish()
