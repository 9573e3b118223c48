// Reads {url, cursor, collections, dids, expect, switchTo: {dids, collections}, expectAfter,
// timeoutMs} on stdin and subscribes with @skyware/jetstream (filters as query parameters).
// Once `expect` commit events arrived it switches filters on the live connection with
// updateOptions (an options_update message) and waits for `expectAfter` commit events that
// only the new filters let through. Prints {before: [...], after: [...], errors: [string]}:
// `after` holds every commit event from the first one the new filters alone allow.
import { Jetstream } from '@skyware/jetstream'

let input = ''
for await (const chunk of process.stdin) input += chunk
const { url, cursor, collections, dids, expect, switchTo, expectAfter, timeoutMs } =
  JSON.parse(input)

const before = []
const after = []
const errors = []
const jetstream = new Jetstream({ endpoint: url, cursor, wantedCollections: collections, wantedDids: dids })
let switched = false
let finish
const finished = new Promise((resolve) => (finish = resolve))
const onlyNew = (e) =>
  switchTo.dids.includes(e.did) && !dids.includes(e.did)
jetstream.on('commit', (event) => {
  const e = {
    did: event.did,
    time_us: event.time_us,
    operation: event.commit.operation,
    collection: event.commit.collection,
    rkey: event.commit.rkey,
    n: event.commit.record?.n,
  }
  if (!switched) {
    before.push(e)
    if (before.length >= expect) {
      switched = true
      jetstream.updateOptions({ wantedCollections: switchTo.collections, wantedDids: switchTo.dids })
    }
    return
  }
  if (after.length > 0 || onlyNew(e)) after.push(e)
  else before.push(e)
  if (after.length >= expectAfter) finish()
})
jetstream.on('error', (err) => errors.push(`${err}`))
jetstream.start()
const timer = setTimeout(finish, timeoutMs)
await finished
clearTimeout(timer)
jetstream.close()
process.stdout.write(JSON.stringify({ before, after, errors }) + '\n', () => process.exit(0))
